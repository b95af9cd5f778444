/* Sparse training of a masked ReLU MLP: the low end of the pruning grid (lthmpi/sparse.py compiles and loads it).
 *
 * Why: with a few percent of the weights left, the dense GEMMs of the XLA path multiply mostly zeros.
 * Here only the kept weights exist (pruned ones are not stored, so they stay exactly zero), and every
 * product runs over them alone.
 *
 * Layout: activations are feature-major, (features, columns) with the batch along the row, in tiles of
 * TILE = 64 columns, so one tile of one row is 8 vectors of 8 floats held in registers while the kept
 * weights of one output unit stream past. Kept weights are stored by blocks of BLOCK input rows, and
 * within a block by output unit (blocked CSC): the BLOCK rows of a tile (32 KiB) stay in L1 while every
 * output unit that reads them passes (docs/performance.md, "The masked trainer", has the measurements).
 * Batches shorter than a tile are padded with zero columns whose loss gradient is zero, so they add
 * exactly nothing to any gradient.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64
#define MAX_LAYERS 16
#define ABI_VERSION 2  /* bump with any change to Layer, Net, Opt or a function's arguments (sparse.py checks it) */

/* Return codes, each named in sparse.py's ERRORS. */
enum { LTH_OK = 0, LTH_EBATCH = 1, LTH_ELAYERS = 2, LTH_ENOMEM = 3, LTH_ELD = 4, LTH_EINDEX = 5, LTH_ELABEL = 6,
       LTH_ESHAPE = 7 };

/* A two-vector lane selection with constant indices: GCC >= 12 and clang spell it __builtin_shufflevector,
 * older GCC only __builtin_shuffle with an index vector. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUFFLE2(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
typedef int32_t i8 __attribute__((vector_size(32)));
#define SHUFFLE2(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, (i8){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4)));

/* Every output unit j of every row block blk that keeps weights there: they are k0 .. k1 - 1. */
#define FOR_EACH_BLOCK_AND_UNIT(L, blk, j, k0, k1)                                  \
    for (int64_t blk = 0; blk < (L)->nblocks; blk++)                                \
        for (int64_t j = 0, k0, k1; j < (L)->nout; j++)                             \
            if ((k0 = (L)->ptr[blk * (L)->nout + j]) != (k1 = (L)->ptr[blk * (L)->nout + j + 1]))
/* Lane selections that sum 4 vectors' lanes into one vector's first 4 lanes (weight_gradient). */
#define LO(a, b) SHUFFLE2(a, b, 0, 1, 2, 3, 8, 9, 10, 11)
#define HI(a, b) SHUFFLE2(a, b, 4, 5, 6, 7, 12, 13, 14, 15)
#define EVEN2(a, b) SHUFFLE2(a, b, 0, 1, 4, 5, 8, 9, 12, 13)
#define ODD2(a, b) SHUFFLE2(a, b, 2, 3, 6, 7, 10, 11, 14, 15)
#define EVEN1(a) SHUFFLE2(a, a, 0, 2, 4, 6, 0, 2, 4, 6)
#define ODD1(a) SHUFFLE2(a, a, 1, 3, 5, 7, 1, 3, 5, 7)

typedef struct {
    int64_t nin, nout, nblocks;   /* inputs, outputs, row blocks of BLOCK inputs */
    const int32_t *ptr;           /* nblocks * nout + 1 offsets into rows / w */
    const int32_t *rows;          /* input row of each kept weight */
    float *w, *b;                 /* kept weights in blocked order, bias */
    float *mw, *vw, *mb, *vb;     /* optimizer slots: Adam m and v; SGD momentum in mw, mb */
    float *gw, *gb;               /* gradient scratch, kept weights and bias */
    int64_t relu;                 /* 1: ReLU after this layer; 0: the logits */
} Layer;

typedef struct {
    int64_t nlayers;
    Layer layer[MAX_LAYERS];
} Net;

typedef struct {
    int64_t kind;                 /* 0 Adam (Keras 3 formulas), 1 SGD with momentum */
    float beta1, beta2, eps, momentum, weight_decay;  /* weight_decay: decoupled (Keras), after the update */
    float l2;                     /* coupled L2 (PyTorch): g += l2 * w before the slots see g */
    int64_t iterations;           /* optimizer steps taken so far (Keras' `iterations`) */
} Opt;

/* What the Python side must agree on before it passes a single struct: out[0..6] = ABI_VERSION, TILE,
 * MAX_LAYERS, sizeof(Layer), sizeof(Net), sizeof(Opt), offsetof(Opt, iterations). */
int lth_abi(int64_t *out) {
    out[0] = ABI_VERSION; out[1] = TILE; out[2] = MAX_LAYERS;
    out[3] = (int64_t)sizeof(Layer); out[4] = (int64_t)sizeof(Net); out[5] = (int64_t)sizeof(Opt);
    out[6] = (int64_t)offsetof(Opt, iterations);
    return LTH_OK;
}

/* The layers chain (each layer's inputs are the last one's outputs) and are within MAX_LAYERS. */
static int check_net(const Net *net) {
    if (net->nlayers < 1 || net->nlayers > MAX_LAYERS) return LTH_ELAYERS;
    for (int64_t l = 0; l < net->nlayers; l++) {
        const Layer *ly = &net->layer[l];
        if (ly->nin < 1 || ly->nout < 1 || (l > 0 && ly->nin != net->layer[l - 1].nout)) return LTH_ESHAPE;
    }
    return LTH_OK;
}

/* Z[j, :] = b[j] + sum over kept weights k of unit j of w[k] * A[rows[k], :], for ncols = TILE * k columns. */
static void forward(const Layer *L, const float *A, int64_t lda, float *Z, int64_t ldz, int64_t ncols) {
    for (int64_t t0 = 0; t0 < ncols; t0 += TILE) {
        for (int64_t j = 0; j < L->nout; j++) {
            v8 *z = (v8 *)(Z + j * ldz + t0);
            float bj = L->b[j];
            v8 bv = {bj, bj, bj, bj, bj, bj, bj, bj};
            for (int v = 0; v < 8; v++) z[v] = bv;
        }
        FOR_EACH_BLOCK_AND_UNIT(L, blk, j, k0, k1) {
            v8 *z = (v8 *)(Z + j * ldz + t0);
            v8 a0 = z[0], a1 = z[1], a2 = z[2], a3 = z[3], a4 = z[4], a5 = z[5], a6 = z[6], a7 = z[7];
            for (int64_t k = k0; k < k1; k++) {
                const v8 *x = (const v8 *)(A + (int64_t)L->rows[k] * lda + t0);
                float wk = L->w[k];
                a0 += wk * x[0]; a1 += wk * x[1]; a2 += wk * x[2]; a3 += wk * x[3];
                a4 += wk * x[4]; a5 += wk * x[5]; a6 += wk * x[6]; a7 += wk * x[7];
            }
            z[0] = a0; z[1] = a1; z[2] = a2; z[3] = a3; z[4] = a4; z[5] = a5; z[6] = a6; z[7] = a7;
        }
        if (L->relu)
            for (int64_t j = 0; j < L->nout; j++) {
                float *z = Z + j * ldz + t0;
                for (int t = 0; t < TILE; t++) z[t] = z[t] > 0.0f ? z[t] : 0.0f;
            }
    }
}

/* Gradients of one layer from dZ (nout, TILE): gw[k] = A[rows[k], :] . dZ[j, :], gb[j] = sum dZ[j, :]. */
static void weight_gradient(const Layer *L, const float *A, const float *dZ) {
    for (int64_t j = 0; j < L->nout; j++) {
        const float *d = dZ + j * TILE;
        float s = 0.0f;
        for (int t = 0; t < TILE; t++) s += d[t];
        L->gb[j] = s;
    }
    FOR_EACH_BLOCK_AND_UNIT(L, blk, j, k0, k1) {
        const v8 *dz = (const v8 *)(dZ + j * TILE);
        v8 d0 = dz[0], d1 = dz[1], d2 = dz[2], d3 = dz[3], d4 = dz[4], d5 = dz[5], d6 = dz[6], d7 = dz[7];
#define DOT(x) (((x)[0] * d0 + (x)[1] * d1) + ((x)[2] * d2 + (x)[3] * d3) + ((x)[4] * d4 + (x)[5] * d5) + ((x)[6] * d6 + (x)[7] * d7))
        int64_t k = k0;
        for (; k + 4 <= k1; k += 4) {  /* four dot products, their horizontal sums shared */
            v8 s0 = DOT((const v8 *)(A + (int64_t)L->rows[k] * TILE));
            v8 s1 = DOT((const v8 *)(A + (int64_t)L->rows[k + 1] * TILE));
            v8 s2 = DOT((const v8 *)(A + (int64_t)L->rows[k + 2] * TILE));
            v8 s3 = DOT((const v8 *)(A + (int64_t)L->rows[k + 3] * TILE));
            v8 a = LO(s0, s1) + HI(s0, s1);
            v8 b = LO(s2, s3) + HI(s2, s3);
            v8 c = EVEN2(a, b) + ODD2(a, b);
            v8 d = EVEN1(c) + ODD1(c);
            L->gw[k] = d[0]; L->gw[k + 1] = d[1]; L->gw[k + 2] = d[2]; L->gw[k + 3] = d[3];
        }
        for (; k < k1; k++) {
            v8 s = DOT((const v8 *)(A + (int64_t)L->rows[k] * TILE));
            L->gw[k] = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
        }
#undef DOT
    }
}

/* dA (nin, TILE) = W dZ, then times the ReLU derivative of A (the layer's input, post-ReLU). */
static void input_gradient(const Layer *L, const float *A, const float *dZ, float *dA) {
    memset(dA, 0, sizeof(float) * L->nin * TILE);
    FOR_EACH_BLOCK_AND_UNIT(L, blk, j, k0, k1) {
        const v8 *dz = (const v8 *)(dZ + j * TILE);
        v8 d0 = dz[0], d1 = dz[1], d2 = dz[2], d3 = dz[3], d4 = dz[4], d5 = dz[5], d6 = dz[6], d7 = dz[7];
        for (int64_t k = k0; k < k1; k++) {
            v8 *x = (v8 *)(dA + (int64_t)L->rows[k] * TILE);
            float wk = L->w[k];
            x[0] += wk * d0; x[1] += wk * d1; x[2] += wk * d2; x[3] += wk * d3;
            x[4] += wk * d4; x[5] += wk * d5; x[6] += wk * d6; x[7] += wk * d7;
        }
    }
    for (int64_t i = 0; i < L->nin * TILE; i++)
        if (!(A[i] > 0.0f)) dA[i] = 0.0f;
}

/* Softmax cross-entropy of the logits' first `batch` columns: returns the mean loss, writes dZ/batch. */
static double softmax_xent(const float *logits, int64_t classes, const int32_t *labels, int64_t batch, float *dZ) {
    double total = 0.0;
    memset(dZ, 0, sizeof(float) * classes * TILE);
    for (int64_t t = 0; t < batch; t++) {
        float m = logits[t];
        for (int64_t c = 1; c < classes; c++) m = fmaxf(m, logits[c * TILE + t]);
        float s = 0.0f;
        for (int64_t c = 0; c < classes; c++) s += expf(logits[c * TILE + t] - m);
        float lse = m + logf(s);
        total += (double)(lse - logits[labels[t] * TILE + t]);
        for (int64_t c = 0; c < classes; c++)
            dZ[c * TILE + t] = (expf(logits[c * TILE + t] - lse) - (c == labels[t] ? 1.0f : 0.0f)) / (float)batch;
    }
    return total / (double)batch;
}

/* One update of n values as Keras 3 does it: decoupled weight decay, then Adam or SGD (momentum); with
 * coupled L2 the gradient is first g + l2 * w (PyTorch's weight_decay), written back into the scratch g. */
static void update(float *w, float *g, float *m, float *v, int64_t n, const Opt *o, float lr, float alpha) {
    if (o->l2 != 0.0f)
        for (int64_t i = 0; i < n; i++) g[i] += o->l2 * w[i];
    if (o->weight_decay != 0.0f)
        for (int64_t i = 0; i < n; i++) w[i] -= w[i] * o->weight_decay * lr;
    if (o->kind == 0) {
        float c1 = 1.0f - o->beta1, c2 = 1.0f - o->beta2;
        for (int64_t i = 0; i < n; i++) {
            m[i] += (g[i] - m[i]) * c1;
            v[i] += (g[i] * g[i] - v[i]) * c2;
            w[i] -= (m[i] * alpha) / (sqrtf(v[i]) + o->eps);
        }
    } else if (o->momentum != 0.0f) {
        for (int64_t i = 0; i < n; i++) {
            m[i] = m[i] * o->momentum - g[i] * lr;
            w[i] += m[i];
        }
    } else {
        for (int64_t i = 0; i < n; i++) w[i] -= g[i] * lr;
    }
}

static int64_t widest(const Net *net) {
    int64_t n = net->layer[0].nin;
    for (int64_t l = 0; l < net->nlayers; l++) n = net->layer[l].nout > n ? net->layer[l].nout : n;
    return n;
}

/* Train n steps; step i takes the rows idx[i * batch ...] of X (nrows rows, row-major, nin0 features) at
 * learning rate lr[i]. Writes the sum of the steps' mean losses (NaN or inf once training diverged) to
 * *loss; returns LTH_OK, or the LTH_E* code of what is wrong (checked before anything is written). */
int lth_train(const Net *net, Opt *opt, const float *X, const int32_t *Y, int64_t nrows, const int32_t *idx,
              int64_t n, int64_t batch, const float *lr, double *loss) {
    int rc = check_net(net);
    if (rc != LTH_OK) return rc;
    if (batch < 1 || batch > TILE) return LTH_EBATCH;
    int64_t L = net->nlayers, width = widest(net), classes = net->layer[L - 1].nout;
    for (int64_t i = 0; i < n * batch; i++) {
        if (idx[i] < 0 || idx[i] >= nrows) return LTH_EINDEX;
        if (Y[idx[i]] < 0 || Y[idx[i]] >= classes) return LTH_ELABEL;
    }
    float *acts[MAX_LAYERS + 1];
    float *buf = malloc(sizeof(float) * TILE * (2 * width + 1));
    int32_t labels[TILE];
    if (!buf) return LTH_ENOMEM;
    float *dz = buf, *da = buf + width * TILE;
    for (int64_t l = 0; l <= L; l++) {
        int64_t rows = l == 0 ? net->layer[0].nin : net->layer[l - 1].nout;
        acts[l] = malloc(sizeof(float) * rows * TILE);
        if (!acts[l]) { for (int64_t q = 0; q < l; q++) free(acts[q]); free(buf); return LTH_ENOMEM; }
    }
    int64_t nin0 = net->layer[0].nin;
    double total = 0.0;
    for (int64_t s = 0; s < n; s++) {
        const int32_t *rows = idx + s * batch;
        float *a0 = acts[0];
        /* The batch, transposed 16 features at a time: the 16 rows of a0 being written stay in L1. */
        for (int64_t i0 = 0; i0 < nin0; i0 += 16) {
            int64_t i1 = i0 + 16 < nin0 ? i0 + 16 : nin0;
            for (int64_t t = 0; t < batch; t++) {
                const float *x = X + (int64_t)rows[t] * nin0;
                for (int64_t i = i0; i < i1; i++) a0[i * TILE + t] = x[i];
            }
            for (int64_t i = i0; i < i1; i++)
                for (int64_t t = batch; t < TILE; t++) a0[i * TILE + t] = 0.0f;
        }
        for (int64_t t = 0; t < batch; t++) labels[t] = Y[rows[t]];
        for (int64_t l = 0; l < L; l++) forward(&net->layer[l], acts[l], TILE, acts[l + 1], TILE, TILE);
        total += softmax_xent(acts[L], net->layer[L - 1].nout, labels, batch, dz);
        for (int64_t l = L - 1; l >= 0; l--) {
            const Layer *ly = &net->layer[l];
            weight_gradient(ly, acts[l], dz);
            if (l > 0) {
                input_gradient(ly, acts[l], dz, da);
                float *tmp = dz; dz = da; da = tmp;
            }
        }
        opt->iterations += 1;
        float step = (float)opt->iterations;
        float alpha = lr[s] * sqrtf(1.0f - powf(opt->beta2, step)) / (1.0f - powf(opt->beta1, step));
        for (int64_t l = 0; l < L; l++) {
            const Layer *ly = &net->layer[l];
            update(ly->w, ly->gw, ly->mw, ly->vw, ly->ptr[ly->nblocks * ly->nout], opt, lr[s], alpha);
            update(ly->b, ly->gb, ly->mb, ly->vb, ly->nout, opt, lr[s], alpha);
        }
    }
    for (int64_t l = 0; l <= L; l++) free(acts[l]);
    free(buf);
    *loss = total;
    return LTH_OK;
}

/* Sum of losses and count of correct predictions over n examples, XT feature-major with leading
 * dimension ld (a multiple of TILE, padded columns ignored). out[0] = loss sum, out[1] = correct. */
int lth_evaluate(const Net *net, const float *XT, int64_t ld, const int32_t *Y, int64_t n, double *out) {
    const int64_t chunk = 8 * TILE;
    int rc = check_net(net);
    if (rc != LTH_OK) return rc;
    int64_t L = net->nlayers;
    float *acts[MAX_LAYERS + 1];
    if (ld % TILE != 0 || ld < n) return LTH_ELD;
    for (int64_t i = 0; i < n; i++)
        if (Y[i] < 0 || Y[i] >= net->layer[L - 1].nout) return LTH_ELABEL;
    for (int64_t l = 1; l <= L; l++) {
        acts[l] = malloc(sizeof(float) * net->layer[l - 1].nout * chunk);
        if (!acts[l]) { for (int64_t q = 1; q < l; q++) free(acts[q]); return LTH_ENOMEM; }
    }
    int64_t classes = net->layer[L - 1].nout;
    double loss = 0.0, correct = 0.0;
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        int64_t cols = n - c0 < chunk ? ((n - c0 + TILE - 1) / TILE) * TILE : chunk;
        forward(&net->layer[0], XT + c0, ld, acts[1], chunk, cols);
        for (int64_t l = 1; l < L; l++) forward(&net->layer[l], acts[l], chunk, acts[l + 1], chunk, cols);
        const float *z = acts[L];
        for (int64_t t = 0; t < cols && c0 + t < n; t++) {
            int64_t best = 0;
            float m = z[t];
            for (int64_t c = 1; c < classes; c++)
                if (z[c * chunk + t] > m) { m = z[c * chunk + t]; best = c; }
            float s = 0.0f;
            for (int64_t c = 0; c < classes; c++) s += expf(z[c * chunk + t] - m);
            int32_t y = Y[c0 + t];
            loss += (double)(m + logf(s) - z[y * chunk + t]);
            correct += best == y;
        }
    }
    for (int64_t l = 1; l <= L; l++) free(acts[l]);
    out[0] = loss;
    out[1] = correct;
    return LTH_OK;
}
