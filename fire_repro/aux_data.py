"""Extra training data (--aux-data): the file formats it reads, memory-mapped, never read whole;
the rewrite of a compressed file into one that maps; and class-conditional generated images for the
bundled data sets, written in the published format.

    load_aux_data(args, train_set)  the --aux-data images and labels, checked, as a Dataset
    read_aux_file(path, ...)        (images, labels) of a file: images mapped (MappedArray), labels in memory
    store(src, dst)                 a compressed .npz rewritten uncompressed, streamed
    join(dst, parts)                the parts of a set (DM-Improves-AT's 20M, 50M) as one .npz, streamed
    generate(dataset, ...)          images from a Gaussian mixture per class of the training split

The formats (docs/generated-data.md):
    this repository's   .npz with `images` (N, H, W, C) uint8 and `labels` (N,) integers
    DM-Improves-AT's    .npz with `image` (N, 32, 32, 3) uint8 and `label` (N,) int64: Wang et al.
                        (2023)'s generated CIFAR images (1m.npz ... 50m_part4.npz), written by np.savez
    Carmon et al.'s     the pickle ti_500K_pseudo_labeled.pickle (`data`, `extrapolated_targets`):
                        only with --trust-pickle, and read whole (a pickle cannot be mapped)

np.savez stores its members uncompressed, so the images of an .npz are a plain array at an offset of
the file: they are mapped read-only (np.memmap), and an image is read from the disk (or the kernel's
page cache, which every process mapping the file shares: DataLoader workers, torchrun's ranks) when
a batch draws it. A 20M-image file (61 GB) needs neither 61 GB of memory nor a copy per process.

Commands:
    python -m fire_repro.aux_data store 1m_compressed.npz 1m.npz     # compressed -> mappable, streamed
    python -m fire_repro.aux_data join 20m.npz 20m_part1.npz 20m_part2.npz   # parts -> one file, streamed
    python -m fire_repro.aux_data generate digits data/digits_gmm.npz --seed 0   # generated digits
"""
import argparse
import os
import shutil
import struct
import zipfile

import numpy as np
import torch

from fire_repro.common import ArgumentParser, UserError, check_input_file, cli, write_atomic
from fire_repro.data import DATASETS, first_images, get_datasets

# The .npz keys (images, labels) of this repository's format and of DM-Improves-AT's
NPZ_KEYS = (("images", "labels"), ("image", "label"))


class MappedArray:
    """An array stored uncompressed at byte `offset` of the file `path` (a .npy member of an .npz
    written by np.savez), mapped read-only in each process on first use. Indexing it returns a
    copy of the rows asked for (an image is 3 KB); pickling it (a DataLoader worker started with
    spawn) passes where the array lives, not its data."""

    def __init__(self, path, offset, dtype, shape, fortran_order=False):
        self.path, self.offset, self.dtype, self.shape = path, offset, np.dtype(dtype), tuple(shape)
        self.fortran_order = fortran_order
        self._map = None

    @property
    def ndim(self):
        return len(self.shape)

    def __len__(self):
        return self.shape[0]

    def array(self):
        """The np.memmap of the whole array (pages are read when touched)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape,
                                  order="F" if self.fortran_order else "C")
        return self._map

    def __getitem__(self, index):
        return np.array(self.array()[index])

    def __getstate__(self):
        return dict(self.__dict__, _map=None)


def npz_member(path, zf, name):
    """A MappedArray of the member `name` (e.g. 'image.npy') of the .npz `path` (open as `zf`),
    which must be stored uncompressed; raises ValueError for a damaged member."""
    info = zf.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header: its name and extra field come next
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"no local header for {name}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])  # not the central directory's: they differ
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{name}: .npy format version {version} (np.savez writes 1.0 or 2.0)")
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{name} holds Python objects (pickled), not numbers")
    if offset - start + dtype.itemsize * int(np.prod(shape)) != info.file_size:
        raise ValueError(f"{name}: its header says {shape} {dtype}, its member holds {info.file_size} bytes")
    if start + info.file_size > os.path.getsize(path):
        raise ValueError(f"{name} ends past the end of the file (truncated)")
    return MappedArray(path, offset, dtype, shape, fortran)


def read_aux_file(path, trust_pickle=False, flag="--aux-data"):
    """(images, labels) of an extra-data file, unchecked: images (N, H, W[, C]) mapped
    (MappedArray) from an .npz, labels read into memory. Raises UserError for a file that is not
    one of the formats, a compressed .npz (naming the command that rewrites it) or a pickle without
    `trust_pickle`."""
    check_input_file(path, flag)
    if path.endswith((".pickle", ".pkl")):
        if not trust_pickle:
            raise UserError(f"refusing to unpickle {path!r} (unpickling runs code): convert it "
                            f"to .npz (see docs/methods.md) or pass --trust-pickle if you trust the file")
        import pickle
        with open(path, "rb") as f:
            raw = pickle.load(f)
        return np.asarray(raw["data"]), np.asarray(raw["extrapolated_targets"])
    with open(path, "rb") as f:
        if not f.read(4).startswith(b"PK"):
            raise UserError(f"{flag} {path!r} is not an .npz file (no zip header)")
    try:
        with zipfile.ZipFile(path) as zf:
            arrays = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            keys = next((k for k in NPZ_KEYS if set(k) <= arrays), None)
            if keys is None:
                raise UserError(f"cannot read {flag} {path!r}: its arrays are {sorted(arrays)}; expected `images` "
                                f"and `labels` (this repository's .npz) or `image` and `label` (DM-Improves-AT's "
                                f"generated data)")
            if zf.getinfo(keys[0] + ".npy").compress_type != zipfile.ZIP_STORED:
                raise UserError(f"{flag} {path!r} is compressed (np.savez_compressed), so it cannot be "
                                f"memory-mapped: rewrite it once uncompressed, streamed (the disk space, not the "
                                f"memory): python -m fire_repro.aux_data store {path} <new>.npz")
            images = npz_member(path, zf, keys[0] + ".npy")
            with zf.open(keys[1] + ".npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (bad zip, truncated member, object arrays, ...)
        raise UserError(f"cannot read {flag} {path!r}: {type(e).__name__}: {str(e)[:150]}") from None
    return images, labels


class AuxData(torch.utils.data.Dataset):
    """Extra labelled images (uint8, N x H x W x C; a MappedArray or an array) with the training
    set's augmentation; yields (image, label, -1)."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = np.asarray(self.images[i])  # one image, read (and copied) out of the file's mapping
        if img.ndim == 2:
            img = img[..., None]
        if self.transform is not None:  # torchvision pipelines start from PIL images
            from PIL import Image
            x = self.transform(Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img))
        else:
            x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        return x, int(self.labels[i]), -1


def load_aux_data(args, train_set):
    """--aux-data as a Dataset with the training set's augmentation, checked: uint8 images of the
    data set's shape (N, H, W, C), or (N, H, W) for one channel; as many integer labels, each a
    class of the data set. Each mistake is one UserError line."""
    path = args.aux_data
    num_classes = DATASETS[args.dataset].classes
    images, labels = read_aux_file(path, args.trust_pickle)
    labels = np.asarray(labels)
    shape = tuple(train_set[0][0].shape)  # (C, H, W) of the training images
    expected = (shape[1], shape[2], shape[0])
    image_shape = tuple(images.shape[1:]) + ((1,) if images.ndim == 3 else ())
    if images.dtype != np.uint8 or image_shape != expected:
        raise UserError(f"--aux-data images must be uint8 of shape (N, {shape[1]}, {shape[2]}, "
                        f"{shape[0]}) for {args.dataset}, got {images.dtype} {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"--aux-data labels must be a non-empty 1-D array of integer class indices "
                        f"(not one-hot), got {labels.dtype} of shape {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    if len(labels) != len(images) or labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"--aux-data labels must be {len(images)} integers in [0, {num_classes}), got "
                        f"{len(labels)} in [{labels.min()}, {labels.max()}]")
    return AuxData(images, labels, train_set.transform)


def store(src, dst):
    """Rewrite the .npz `src` with every member uncompressed (np.savez's layout, which
    --aux-data maps), member by member through a 16 MiB buffer: the memory stays small whatever
    the file's size; `dst` is written atomically."""
    check_input_file(src, "store")
    try:
        with zipfile.ZipFile(src) as zin:
            def copy(f):
                with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zout:
                    for info in zin.infolist():
                        with zin.open(info) as r, zout.open(info.filename, "w", force_zip64=True) as w:
                            shutil.copyfileobj(r, w, 1 << 24)
            write_atomic(dst, copy, binary=True)
    except zipfile.BadZipFile as e:
        raise UserError(f"cannot read {src!r}: {e}") from None


def join(dst, parts):
    """One .npz in DM-Improves-AT's format (`image`, `label`, uncompressed) of the images and labels
    of `parts` in order (DM-Improves-AT's 20m_part1.npz, 20m_part2.npz: their 20M set), copied
    through a 64 MiB buffer: the memory stays small whatever the files' sizes (their merge-data.py
    loads every part, about twice the joined size). Every part must be mappable (store() first);
    `dst` is written atomically."""
    arrays = [read_aux_file(path, flag="join") for path in parts]
    shapes = {(tuple(images.shape[1:]), images.dtype.str) for images, _ in arrays}
    if len(shapes) != 1 or any(not isinstance(images, MappedArray) for images, _ in arrays):
        raise UserError(f"join: the parts must be .npz files of images of one shape and type, got "
                        f"{sorted(shapes)}")
    (shape, descr), = shapes
    total = sum(len(images) for images, _ in arrays)
    labels = np.concatenate([np.asarray(y).astype(np.int64, copy=False) for _, y in arrays])
    if len(labels) != total:
        raise UserError(f"join: {len(labels)} labels for {total} images")

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("image.npy", "w", force_zip64=True) as w:
                np.lib.format.write_array_header_2_0(w, dict(descr=descr, fortran_order=False, shape=(total, *shape)))
                for images, _ in arrays:
                    rows = max(1, (64 << 20) // max(1, images.dtype.itemsize * int(np.prod(shape))))
                    for start in range(0, len(images), rows):
                        w.write(np.ascontiguousarray(images.array()[start:start + rows]).tobytes())
            with z.open("label.npy", "w", force_zip64=True) as w:
                np.lib.format.write_array(w, labels)
    write_atomic(dst, write, binary=True)
    return total


# ---- generated images for the bundled data sets ---------------------------------------------------
def generate(dataset, ratio=20.0, keep=0.2, components=5, dims=40, seed=0, data_dir="data"):
    """Class-conditional generated images of `dataset` (digits, mnist5k), fitted to its training
    split only (never its validation or test images), as Wang et al. (2023) make their 1M set:

    - the generator: one GaussianMixture (`components` full-covariance components) per class in a
      PCA space of `dims` dimensions (fitted to the training split), sampled, mapped back to pixels,
      clipped to [0, 1] and rounded to uint8;
    - the filter: of `ratio * training images / keep` samples (per class, equally), the `keep` share
      per class that a classifier of the training split (logistic regression on the PCA features)
      gives the highest probability of the class it was generated for (Wang et al. keep the top 20%
      by a WRN-28-10's probability, 1M of 5M);
    - the label: the class it was generated for (the classifier filters, it does not relabel).

    Returns (images (N, H, W, C) uint8, labels (N,) int64), class by class, as np.savez writes
    DM-Improves-AT's files (write them with write_generated)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.mixture import GaussianMixture
    d = DATASETS[dataset]
    train, _, _ = get_datasets(argparse.Namespace(dataset=dataset, val_size=d.val_size, data_dir=data_dir))
    x, y = first_images(train)
    x, y = x.flatten(1).numpy().astype(np.float64), y.numpy()
    rng = np.random.default_rng(seed)
    pca = PCA(n_components=dims, random_state=seed).fit(x)
    z = pca.transform(x)
    judge = LogisticRegression(max_iter=2000).fit(z, y)
    per_class = int(round(ratio * len(x) / d.classes))
    images, labels = [], []
    for c in range(d.classes):
        gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-3,
                              random_state=int(rng.integers(2**31))).fit(z[y == c])
        gmm.random_state = int(rng.integers(2**31))
        samples, _ = gmm.sample(int(np.ceil(per_class / keep)))
        prob = judge.predict_proba(samples)[:, c]
        best = samples[np.argsort(-prob, kind="stable")[:per_class]]
        pixels = np.clip(pca.inverse_transform(best), 0, 1).reshape(-1, *d.shape)  # (n, C, H, W)
        images.append(np.rint(pixels * 255).astype(np.uint8).transpose(0, 2, 3, 1))
        labels.append(np.full(per_class, c, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def write_generated(path, images, labels):
    """(images, labels) as DM-Improves-AT's .npz: `image`, `label`, np.savez (uncompressed), atomically."""
    write_atomic(path, lambda f: np.savez(f, image=images, label=labels), binary=True)


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("store", help="rewrite a compressed .npz uncompressed (mappable), streamed")
    s.add_argument("src", help="the compressed .npz (np.savez_compressed)")
    s.add_argument("dst", help="the .npz to write (uncompressed)")
    j = sub.add_parser("join", help="one .npz of several parts' images and labels (DM-Improves-AT's 20M and "
                                    "50M sets come in parts), streamed")
    j.add_argument("dst", help="the .npz to write (image, label; uncompressed)")
    j.add_argument("parts", nargs="+", help="the parts, in order (each uncompressed: store them first)")
    g = sub.add_parser("generate", help="class-conditional images from a Gaussian mixture per class of the "
                                        "training split, in DM-Improves-AT's format (image, label)")
    g.add_argument("dataset", choices=[k for k, v in DATASETS.items() if v.in_memory],
                   help="a bundled data set (its training split only is seen)")
    g.add_argument("out", help="the .npz to write")
    g.add_argument("--ratio", type=float, default=20.0,
                   help="generated images per training image (Wang et al.'s 1M for CIFAR-10's 50,000: 20)")
    g.add_argument("--keep", type=float, default=0.2,
                   help="share of the samples kept per class, the most probable under a classifier of the "
                        "training split (Wang et al.'s 1M: the top 0.2 of 5M)")
    g.add_argument("--components", type=int, default=5, help="Gaussian components per class")
    g.add_argument("--dims", type=int, default=40, help="PCA dimensions the mixtures live in")
    g.add_argument("--seed", type=int, default=0, help="seed of the mixtures and their samples")
    g.add_argument("--data-dir", type=str, default="data", help="where the data set is (bundled ones: unused)")
    a = p.parse_args(argv)
    if a.command == "store":
        store(a.src, a.dst)
        print(f"{a.dst}: {os.path.getsize(a.dst):,} bytes, uncompressed")
        return 0
    if a.command == "join":
        print(f"{a.dst}: {join(a.dst, a.parts):,} images of {len(a.parts)} parts")
        return 0
    if not (a.ratio > 0 and 0 < a.keep <= 1 and a.components >= 1 and a.dims >= 1):
        p.error("--ratio must be > 0, --keep in (0, 1], --components and --dims >= 1")
    images, labels = generate(a.dataset, a.ratio, a.keep, a.components, a.dims, a.seed, a.data_dir)
    write_generated(a.out, images, labels)
    print(f"{a.out}: {len(labels):,} generated {a.dataset} images, {np.bincount(labels).tolist()} per class")
    return 0


if __name__ == "__main__":
    cli(main)
