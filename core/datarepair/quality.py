"""Input quality: is a training input drawn from the distribution of the trusted clean inputs?

A corrupted input with a correct label (sensor noise, blur) is not seen by the loss scores of step 1: the models
still classify most such images right, so their given label is not unlikely (corrupt20 AUROC 63%,
docs/datarepair.md). What does change is the image itself, in a way that low-level statistics show without a
model: Gaussian noise adds energy at every spatial frequency, blur removes the high ones. Per image (pixels in
[0, 1], the channel mean as luminance) this module computes a small vector of such statistics
(:data:`STATISTICS`):

- the log energy in each of four radial spatial-frequency bands of the luminance's 2-D FFT (DC removed), from
  the lowest to the highest (the image's power spectrum, coarsely);
- the log share of the energy above half the Nyquist frequency (the high-frequency / total ratio: scale free);
- the log mean absolute gradient (total variation per pixel);
- the log of Immerkaer's (1996) noise estimate, the mean absolute response to the Laplacian-difference mask
  ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` (zero on locally linear images, so texture affects it less than noise);
- on colour images, the log mean absolute Laplacian of the chroma (each channel minus the luminance): channel-
  independent noise is colour noise, natural images are smooth in chroma.

The score is the squared Mahalanobis distance of a training sample's statistics to those of the clean inputs,
two-sided by construction (too little high-frequency energy, as after blur, is as far as too much, as after
noise). The clean set is split into the same folds as step 1: for each fold the mean and covariance are fitted on
the other folds, its held-out clean inputs give the null distribution, the training samples' distances are
averaged over the folds. No corruption type, no threshold and no corruption rate is fitted: the flag is the clean
null's quantile, like the other scores of step 1 (:func:`core.datarepair.identify.identify` puts it on the same
scale and Bonferroni-corrects over the references).

Cost: one FFT of each image, streamed in batches of ``batch_size`` (memory O(batch x H x W), never N x H x W in
float); the statistics themselves are N x 8 floats.
"""

from __future__ import annotations

import numpy as np

from core.data.imageset import ImageSet

STATISTICS = ("log_band_energy_1", "log_band_energy_2", "log_band_energy_3", "log_band_energy_4",
              "log_high_frequency_share", "log_total_variation", "log_noise_estimate", "log_chroma_laplacian")
_EPS = 1e-10
MIN_SIDE = 4  # the 3x3 noise mask and four frequency bands need at least this many pixels a side
_NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)


def _radial_bands(h: int, w: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Boolean masks over the (h, w//2+1) rfft2 grid for four equal-width bands of radial frequency in
    (0, 0.5] cycles/pixel (corners beyond 0.5 go to the last band), and the mask above 0.25 (half Nyquist)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    r = np.sqrt(fy ** 2 + fx ** 2)
    edges = [0.0, 0.125, 0.25, 0.375, np.inf]
    bands = [(r > lo) & (r <= hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return bands, r > 0.25


def _conv3(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """'valid' 3x3 correlation of ``x`` (..., H, W) with ``mask``."""
    h, w = x.shape[-2:]
    return sum(mask[i, j] * x[..., i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))


def image_statistics(x: np.ndarray) -> np.ndarray:
    """The :data:`STATISTICS` of each image of a uint8 ``N x H x W x C`` batch, float64 ``N x 8`` (the chroma
    column is 0 for grey images)."""
    n, h, w, c = x.shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ValueError(f"input-quality statistics need images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got {h}x{w}")
    img = x.astype(np.float32) / 255.0
    lum = img.mean(3)
    ac = lum - lum.mean((1, 2), keepdims=True)
    # the rfft2 grid holds each non-self-conjugate frequency once: weight them twice so the bands sum to the energy
    power = np.abs(np.fft.rfft2(ac)) ** 2
    weight = np.full(power.shape[1:], 2.0, dtype=np.float32)
    weight[:, 0] = 1.0
    if w % 2 == 0:
        weight[:, -1] = 1.0
    power = power * weight
    bands, high = _radial_bands(h, w)
    out = np.zeros((n, len(STATISTICS)), dtype=np.float64)
    total = power.sum((1, 2)) / (h * w) ** 2
    for b, mask in enumerate(bands):
        out[:, b] = np.log(power[:, mask].sum(1) / (h * w) ** 2 + _EPS)
    out[:, 4] = np.log(power[:, high].sum(1) / (h * w) ** 2 + _EPS) - np.log(total + _EPS)
    tv = np.abs(np.diff(lum, axis=1)).mean((1, 2)) + np.abs(np.diff(lum, axis=2)).mean((1, 2))
    out[:, 5] = np.log(tv + _EPS)
    out[:, 6] = np.log(np.sqrt(np.pi / 2) / 6 * np.abs(_conv3(lum, _NOISE_MASK)).mean((1, 2)) + _EPS)
    if c > 1:
        chroma = np.moveaxis(img - lum[..., None], 3, 1)  # N x C x H x W
        out[:, 7] = np.log(np.abs(_conv3(chroma, _NOISE_MASK)).mean((1, 2, 3)) + _EPS)
    return out


def statistics_of(data: ImageSet, batch_size: int = 1024) -> np.ndarray:
    """:func:`image_statistics` of every image of ``data``, streamed in batches; non-finite values raise a
    ``ValueError`` naming the statistic and the first image."""
    stats = np.concatenate([image_statistics(data.x[i:i + batch_size]) for i in range(0, len(data), batch_size)]) \
        if len(data) else np.zeros((0, len(STATISTICS)))
    check_statistics(stats, "images")
    return stats


def check_statistics(stats: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` naming the first non-finite input-quality statistic (column and row)."""
    bad = ~np.isfinite(stats)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"input-quality statistic {STATISTICS[col]!r} is not finite (NaN/Inf) for "
                         f"{int(bad.any(1).sum())} {what} (first index {row}); the images or the statistic's "
                         "computation are broken")


def _fit(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, precision matrix (ridge-regularised, constant columns dropped) and the kept columns."""
    sd = stats.std(0)
    keep = sd > 1e-8
    s = stats[:, keep]
    mu = s.mean(0)
    cov = np.cov(s, rowvar=False).reshape(keep.sum(), keep.sum())
    cov += 1e-6 * max(float(np.trace(cov)) / max(1, len(cov)), 1e-12) * np.eye(len(cov))
    return mu, np.linalg.inv(cov), keep


def mahalanobis(stats: np.ndarray, fit: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``stats`` to the fitted clean statistics."""
    mu, prec, keep = fit
    d = stats[:, keep] - mu
    return np.einsum("ij,jk,ik->i", d, prec, d)


def input_quality_scores(train_stats: np.ndarray, clean_stats: np.ndarray, parts: list[np.ndarray]
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(training scores averaged over the folds, out-of-fold clean null scores): per fold of ``parts`` (indices
    into the clean set), the distance to the statistics of the other folds."""
    train = np.zeros(len(train_stats))
    null = np.zeros(len(clean_stats))
    for held in parts:
        fit_idx = np.setdiff1d(np.arange(len(clean_stats)), held)
        if len(fit_idx) < 2:
            raise ValueError(f"input quality needs at least 2 clean images per fitting fold, got {len(fit_idx)}")
        f = _fit(clean_stats[fit_idx])
        train += mahalanobis(train_stats, f) / len(parts)
        null[held] = mahalanobis(clean_stats[held], f)
    for name, values in (("training samples", train), ("clean samples", null)):
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ValueError(f"input-quality distances are not finite for {len(bad)} {name} (first index "
                             f"{int(bad[0])}); the clean statistics' covariance is singular or broken")
    return train, null
