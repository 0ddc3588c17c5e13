"""Calibration text -> token samples, and the observers that gather activation statistics.

Text comes from the embedded default set that ships in the package, a local ``.txt``
(documents separated by blank lines) or ``.jsonl`` (a ``"text"`` field per line), or a
dataset id read with the ``datasets`` library when the machine is online.
"""

from __future__ import annotations

import json
from collections import defaultdict
from importlib import resources
from pathlib import Path

import torch

from ..kernels.quant import symmetric_scale

DEFAULT_CALIBRATION = "embedded"


class CalibrationDataError(ValueError):
    """Calibration text that cannot give even one sample; the message says what to do."""


def _read_documents(source: str) -> list[str]:
    if source == DEFAULT_CALIBRATION:
        text = resources.files("vllm_quamba.data").joinpath("calibration.txt").read_text()
        return [doc for doc in text.split("\n\n") if doc.strip()]
    path = Path(source)
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationDataError(
                f"calibration file {path} is unreadable ({exc}): --calib takes a UTF-8 .txt file "
                "(documents separated by blank lines) or a .jsonl file (a 'text' field per line)"
            ) from exc
        if path.suffix == ".jsonl":
            return [_jsonl_text(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        return [doc for doc in text.split("\n\n") if doc.strip()]
    return _dataset_documents(source)


def _jsonl_text(path: Path, line_no: int, line: str) -> str:
    try:
        return json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CalibrationDataError(
            f"{path}:{line_no}: each .jsonl line must be an object with a 'text' field"
        ) from exc


def _dataset_documents(dataset_id: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationDataError(
            f"--calib {dataset_id!r} is not a local file; reading a dataset id needs the "
            "'datasets' package and network access (pip install datasets), or pass a .txt/.jsonl file"
        ) from exc
    try:
        rows = datasets.load_dataset(dataset_id, split="train", streaming=True)
        return [row["text"] for _, row in zip(range(4096), rows)]
    except Exception as exc:
        raise CalibrationDataError(f"could not read calibration dataset {dataset_id!r} ({exc})") from exc


def calibration_samples(source: str, tokenizer, num_samples: int, seqlen: int) -> list[torch.Tensor]:
    """Up to ``num_samples`` token windows of ``seqlen`` from the documents, joined by EOS."""
    documents = _read_documents(source)
    if not documents:
        raise CalibrationDataError(
            f"calibration source {source!r} holds no text: give --calib a file with text in it, "
            "or leave --calib out to use the embedded calibration set"
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
        if len(ids) >= num_samples * seqlen:
            break
    usable = min(num_samples, len(ids) // seqlen)
    if usable == 0:
        raise CalibrationDataError(
            f"calibration source {source!r} has {len(ids)} tokens, fewer than one sample of "
            f"--calib-seqlen {seqlen}: give more text or a smaller --calib-seqlen"
        )
    return [torch.tensor(ids[i * seqlen:(i + 1) * seqlen]) for i in range(usable)]


class ActivationStats:
    """Per layer: absmax of each quantized activation, plus the reorder statistic.

    Reductions keep what the recipe needs: per-tensor maxima for in_proj input/z/dt/out_proj
    input, per-segment for xBC, per-group for B/C, per-channel for x (its scales are grouped
    after sort-and-cluster) and per-element for the final SSM state.
    """

    def __init__(self, n_groups: int):
        self.n_groups = n_groups
        self.absmax: dict[tuple[int, str], torch.Tensor] = {}
        self.channel_mean_abs: dict[int, torch.Tensor] = defaultdict(lambda: None)

    def _update(self, key: tuple[int, str], value: torch.Tensor) -> None:
        old = self.absmax.get(key)
        self.absmax[key] = value if old is None else torch.maximum(old, value)

    def __call__(self, layer: int, point: str, t: torch.Tensor) -> None:
        t = t.detach().float()
        if point == "x":
            self._update((layer, point), t.abs().amax(dim=0))
            mean_abs = t.abs().mean(dim=0)
            old = self.channel_mean_abs[layer]
            self.channel_mean_abs[layer] = mean_abs if old is None else torch.maximum(old, mean_abs)
        elif point in ("B", "C"):
            self._update((layer, point), t.abs().reshape(-1, self.n_groups, t.shape[-1] // self.n_groups).amax(dim=(0, 2)))
        elif point == "ssm_state":
            self._update((layer, point), t.abs())
        else:
            self._update((layer, point), t.abs().amax().reshape(1))

    def scale(self, layer: int, point: str) -> torch.Tensor:
        return symmetric_scale(self.absmax[(layer, point)])


# Quamba's percentile observer (quamba.md section 1, "at HEAD"): per calibration sample
# q = quantile(|t|, alpha); the first sample sets m = q, later ones m <- m + MOMENTUM * (q - m).
PERCENTILE_MOMENTUM = 0.01


def abs_quantile(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """quantile(|t|, alpha) with linear interpolation (torch.quantile's), for any size."""
    values = t.detach().float().abs().flatten().sort().values
    position = alpha * (values.numel() - 1)
    lo = int(position)
    hi = min(lo + 1, values.numel() - 1)
    frac = position - lo
    return (values[lo] + frac * (values[hi] - values[lo])).reshape(1)


class MambaActivationStats:
    """Per (layer, point) per-tensor statistics for the Quamba W8A8 Mamba1 recipe.

    ``percentile_points`` ("u", the SSM input, and "ssm_state", the final prefill state) use the
    percentile observer when ``percentile_alpha`` is set; every other point, and these too when
    it is None (the naive baseline), the absmax over all calibration samples. One call per
    (layer, point) per calibration sample, as the forward of one sample makes.
    """

    percentile_points = ("u", "ssm_state")

    def __init__(self, percentile_alpha: float | None):
        self.percentile_alpha = percentile_alpha
        self.values: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self, layer: int, point: str, t: torch.Tensor) -> None:
        key = (layer, point)
        old = self.values.get(key)
        if self.percentile_alpha is not None and point in self.percentile_points:
            q = abs_quantile(t, self.percentile_alpha)
            self.values[key] = q if old is None else old + PERCENTILE_MOMENTUM * (q - old)
        else:
            amax = t.detach().float().abs().amax().reshape(1)
            self.values[key] = amax if old is None else torch.maximum(old, amax)

    def scale(self, layer: int, point: str) -> torch.Tensor:
        return symmetric_scale(self.values[(layer, point)])
