"""Make the tiny test fixtures of vllm-quamba from text that ships with this machine.

Run from the repository root (CPU only; about 16 minutes on 2 idle cores, longer when shared):

    .venv/bin/python tests/assets/train_tiny.py

It writes

* ``tests/assets/heldout.txt``         held-out documents (plain text) for perplexity tests;
* ``vllm_quamba/data/calibration.txt`` an excerpt of the training split, the converter's
  default calibration text;
* ``tests/assets/tiny-mamba2/``         a trained ``Mamba2ForCausalLM`` plus tokenizer;
* ``tests/assets/tiny-mamba1/``         a trained ``MambaForCausalLM`` plus the same tokenizer.

Text sources (all English prose, read from the local installation, nothing downloaded):

1. ``pydoc_data.topics.topics`` of the running interpreter's standard library (the Python
   language-reference text behind ``help('TOPIC')``); one document per topic.
2. ``/usr/share/common-licenses/<name>`` for the names in ``LICENSE_NAMES`` (Debian package
   ``base-files``); one document per licence.
3. ``/usr/share/doc/git/RelNotes/X.Y.0.txt`` (Debian package ``git``): the release notes of
   feature releases only (maintenance-release notes repeat them); one document per file.
4. The docstrings of the running interpreter's standard-library modules (``*.py`` under
   ``sysconfig.get_paths()['stdlib']``, minus the directories in ``STDLIB_EXCLUDED_DIRS``),
   read with ``ast`` without importing anything; one document per module, holding its module,
   class and function docstrings in source order.

Documents listed in ``HELDOUT_DOCUMENTS`` form the held-out split; all others are trained on.
The script stops with a clear message when a source is missing. Everything is seeded; with the
same sources, library versions and thread count the outputs are reproducible (training runs a
fixed number of steps, calibrated to about 8 minutes per model on this 2-core machine).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import random
import re
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = REPO_ROOT / "tests" / "assets"
PACKAGE_DATA_DIR = REPO_ROOT / "vllm_quamba" / "data"
HELDOUT_PATH = ASSETS_DIR / "heldout.txt"
CALIBRATION_PATH = PACKAGE_DATA_DIR / "calibration.txt"

SEED = 0
NUM_THREADS = 2
VOCAB_SIZE = 2048
EOS_TOKEN = "<|endoftext|>"  # also bos, pad and unk; token id 0
SEQ_LEN = 256
BATCH_SIZE = 16
PEAK_LR = 3e-3
FINAL_LR_FRACTION = 0.1
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
LOG_EVERY = 25
CALIBRATION_CHARS = 150_000
DOCUMENT_SEPARATOR = "\n\n"

# Fixed step counts, calibrated to roughly 8 minutes each on the 2-core build machine.
TRAIN_STEPS = {"mamba2": 1400, "mamba1": 350}

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_NAMES = (
    "Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2",
    "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0",
)
GIT_RELNOTES_DIR = Path("/usr/share/doc/git/RelNotes")
GIT_FEATURE_RELEASE = re.compile(r"^\d+\.\d+\.0\.txt$")
STDLIB_EXCLUDED_DIRS = {
    "site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo",
    "pydoc_data", "ensurepip", "distutils", "__pycache__",
}
MIN_DOCSTRING_DOCUMENT_CHARS = 200

HELDOUT_DOCUMENTS = (
    ("pydoc", "formatstrings"),
    ("pydoc", "execmodel"),
    ("pydoc", "import"),
    ("license", "MPL-2.0"),
    ("git", "2.30.0.txt"),
    ("docstrings", "statistics.py"),
)

GENERATION_PROMPTS = (
    "The import statement",
    "This License applies to",
    "Git 2.40 Release Notes\n",
)

MAMBA2_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=4, state_size=32, head_dim=32,
    num_heads=8, expand=2, n_groups=1, conv_kernel=4, chunk_size=64, tie_word_embeddings=True,
    rms_norm=True, residual_in_fp32=True, use_conv_bias=True, use_bias=False,
    initializer_range=0.02, layer_norm_epsilon=1e-5,
    bos_token_id=0, eos_token_id=0, pad_token_id=0,
)
MAMBA1_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=4, state_size=16, expand=2,
    conv_kernel=4, time_step_rank=8, tie_word_embeddings=True, residual_in_fp32=True,
    use_conv_bias=True, use_bias=False, initializer_range=0.02, layer_norm_epsilon=1e-5,
    bos_token_id=0, eos_token_id=0, pad_token_id=0,
)


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str


# ----------------------------------------------------------------------------- text sources


def fail(message: str) -> None:
    sys.exit(f"train_tiny.py: {message}")


def normalise_whitespace(text: str) -> str:
    """Unify newlines, expand tabs, drop control characters and trailing spaces, squeeze blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def load_pydoc_topics() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        fail("pydoc_data.topics is missing from this Python's standard library")
    return [Document("pydoc", name, topics[name]) for name in sorted(topics)]


def load_licenses() -> list[Document]:
    documents = []
    for name in LICENSE_NAMES:
        path = LICENSE_DIR / name
        if not path.is_file():
            fail(f"{path} is missing (Debian package base-files)")
        documents.append(Document("license", name, path.read_text(encoding="utf-8")))
    return documents


def load_git_release_notes() -> list[Document]:
    if not GIT_RELNOTES_DIR.is_dir():
        fail(f"{GIT_RELNOTES_DIR} is missing (Debian package git)")
    paths = [p for p in GIT_RELNOTES_DIR.iterdir() if GIT_FEATURE_RELEASE.match(p.name)]
    if not paths:
        fail(f"no feature-release notes (X.Y.0.txt) under {GIT_RELNOTES_DIR}")
    version = lambda p: tuple(int(part) for part in p.name.split(".")[:3])  # noqa: E731
    return [Document("git", p.name, p.read_text(encoding="utf-8")) for p in sorted(paths, key=version)]


def module_docstrings(source: str) -> str:
    """Module, class and function docstrings of one Python file, in source order."""
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    tree = ast.parse(source)
    found = [n for n in ast.walk(tree) if isinstance(n, nodes) and ast.get_docstring(n)]
    found.sort(key=lambda n: getattr(n, "lineno", 0))
    return DOCUMENT_SEPARATOR.join(ast.get_docstring(n) for n in found)


def load_stdlib_docstrings() -> list[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not (stdlib / "os.py").is_file():
        fail(f"the standard library is not where sysconfig says ({stdlib})")
    documents = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if STDLIB_EXCLUDED_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            text = module_docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if len(text) >= MIN_DOCSTRING_DOCUMENT_CHARS:
            documents.append(Document("docstrings", relative.as_posix(), text))
    return documents


def load_corpus() -> list[Document]:
    raw = load_pydoc_topics() + load_licenses() + load_git_release_notes() + load_stdlib_docstrings()
    documents = [Document(d.source, d.name, normalise_whitespace(d.text)) for d in raw]
    return [d for d in documents if d.text]


def split_by_document(documents: list[Document]) -> tuple[list[Document], list[Document]]:
    keys = {(d.source, d.name) for d in documents}
    missing = [key for key in HELDOUT_DOCUMENTS if key not in keys]
    if missing:
        fail(f"held-out documents not found in the sources: {missing}")
    heldout = [d for d in documents if (d.source, d.name) in HELDOUT_DOCUMENTS]
    train = [d for d in documents if (d.source, d.name) not in HELDOUT_DOCUMENTS]
    return train, heldout


def calibration_excerpt(train: list[Document], num_chars: int, seed: int) -> list[Document]:
    """Whole training documents in a seeded random order until ``num_chars`` are reached."""
    order = list(train)
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for document in order:
        if total >= num_chars:
            break
        chosen.append(document)
        total += len(document.text) + len(DOCUMENT_SEPARATOR)
    return chosen


def join_documents(documents: list[Document]) -> str:
    return DOCUMENT_SEPARATOR.join(d.text for d in documents) + "\n"


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(train: list[Document]):
    """Byte-level BPE with ``VOCAB_SIZE`` entries, ``EOS_TOKEN`` being id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((d.text for d in train), trainer=trainer)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE and tokenizer.token_to_id(EOS_TOKEN) == 0
    return tokenizer


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for transformers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special_tokens = {name: EOS_TOKEN for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "special_tokens_map.json", special_tokens)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def encode_documents(tokenizer, documents: list[Document]) -> torch.Tensor:
    """One token stream: each document followed by the end-of-text token."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([d.text for d in documents]):
        ids.extend(encoding.ids)
        ids.append(0)
    return torch.tensor(ids, dtype=torch.long)


def encode_text(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)


# ----------------------------------------------------------------------------- evaluation


def heldout_windows(token_ids: torch.Tensor, window: int = SEQ_LEN) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows; the first token of each window is context only."""
    windows = list(token_ids.split(window))
    return [w for w in windows if len(w) >= 2]


@torch.no_grad()
def heldout_perplexity(model, token_ids: torch.Tensor, window: int = SEQ_LEN, batch_size: int = 16) -> float:
    """Token-level perplexity over ``token_ids`` in non-overlapping windows of ``window`` tokens."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    windows = heldout_windows(token_ids, window)
    full = [w for w in windows if len(w) == window]
    groups = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    groups += [w[None] for w in windows if len(w) != window]
    for batch in groups:
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def unigram_perplexity(train_ids: torch.Tensor, token_ids: torch.Tensor, window: int = SEQ_LEN) -> float:
    """Add-one smoothed unigram model of the training stream, scored on the same targets."""
    counts = torch.bincount(train_ids, minlength=VOCAB_SIZE).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    targets = torch.cat([w[1:] for w in heldout_windows(token_ids, window)])
    return math.exp(-log_probs[targets].mean().item())


# ----------------------------------------------------------------------------- training


def learning_rate(step: int, total_steps: int) -> float:
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return PEAK_LR * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine)


def make_optimizer(model) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on A_log, D, dt_bias, norms, biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))


def sample_batch(stream: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH_SIZE,), generator=generator)
    return torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])


def train_model(model, stream: torch.Tensor, steps: int, max_minutes: float | None) -> float:
    """Train for ``steps`` steps (or until ``max_minutes``); returns the wall-clock seconds."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = make_optimizer(model)
    model.train()
    start, running = time.time(), 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        batch = sample_batch(stream, generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % LOG_EVERY == 0:
            elapsed, lr = time.time() - start, learning_rate(step, steps)
            print(f"  step {step + 1:5d}/{steps}  loss {running / LOG_EVERY:.3f}  lr {lr:.2e}  {elapsed:6.0f}s",
                  flush=True)
            running = 0.0
        if max_minutes is not None and time.time() - start > 60 * max_minutes:
            print(f"  stopped by the {max_minutes}-minute time box after {step + 1} steps", flush=True)
            break
    model.eval()
    return time.time() - start


def mamba1_training_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False, **_):
    """Same recurrence as transformers' reference selective scan, with a cheaper backward.

    The reference loop indexes one big tensor per time step, whose backward materialises a
    full-size gradient for every step; unbinding once keeps training on CPU affordable.
    """
    if delta_bias is not None:
        dt = dt + delta_bias[..., None].to(dt.dtype)
    if delta_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(A[None, :, None, :] * dt[..., None])  # [batch, channels, time, state]
    drive = (dt * hidden_states.float())[..., None] * B.transpose(1, 2)[:, None].float()
    state = torch.zeros_like(drive[:, :, 0])
    states = []
    for decay_t, drive_t in zip(decay.unbind(2), drive.unbind(2)):
        state = decay_t * state + drive_t
        states.append(state)
    out = torch.einsum("bdln,bnl->bdl", torch.stack(states, dim=2), C.float())
    if D is not None:
        out = out + hidden_states * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    out = out.to(hidden_states.dtype)
    return (out, state) if return_last_state else out


@contextlib.contextmanager
def faster_mamba1_training():
    """Swap the Mamba1 reference scan for ``mamba1_training_scan`` while training only."""
    import transformers.models.mamba.modeling_mamba as modeling_mamba

    original = modeling_mamba.mamba_selective_scan
    modeling_mamba.mamba_selective_scan = mamba1_training_scan
    try:
        yield
    finally:
        modeling_mamba.mamba_selective_scan = original


# ----------------------------------------------------------------------------- models


def build_model(kind: str):
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(SEED)
    if kind == "mamba2":
        return Mamba2ForCausalLM(Mamba2Config(**MAMBA2_CONFIG))
    return MambaForCausalLM(MambaConfig(**MAMBA1_CONFIG))


def generation_samples(model_dir: Path) -> list[str]:
    """Greedy continuations after a round trip through ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = []
    for prompt in GENERATION_PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            output = model.generate(input_ids, max_new_tokens=40, do_sample=False)
        samples.append(tokenizer.decode(output[0], skip_special_tokens=False))
    return samples


def make_model(kind: str, tokenizer, train_ids, heldout_ids, max_minutes) -> dict:
    out_dir = ASSETS_DIR / f"tiny-{kind}"
    model = build_model(kind)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {kind}: {num_params:,} parameters, {TRAIN_STEPS[kind]} steps of {BATCH_SIZE}x{SEQ_LEN} tokens",
          flush=True)
    scan_patch = faster_mamba1_training() if kind == "mamba1" else contextlib.nullcontext()
    with scan_patch:
        seconds = train_model(model, train_ids, TRAIN_STEPS[kind], max_minutes)
    perplexity = heldout_perplexity(model, heldout_ids)
    print(f"  trained in {seconds / 60:.1f} min; held-out perplexity {perplexity:.2f}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # transformers 5 always writes model.safetensors
    save_tokenizer(tokenizer, out_dir)
    for sample in generation_samples(out_dir):
        print(f"  sample: {sample!r}", flush=True)
    return {
        "parameters": num_params,
        "train_seconds": round(seconds, 1),
        "heldout_perplexity": round(perplexity, 3),
    }


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(TRAIN_STEPS), default=["mamba2", "mamba1"])
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="optional wall-clock safety stop per model (breaks reproducibility if hit)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(NUM_THREADS)
    documents = load_corpus()
    train, heldout = split_by_document(documents)
    print(f"corpus: {len(documents)} documents, {sum(len(d.text) for d in documents):,} chars; "
          f"train {len(train)} docs / {sum(len(d.text) for d in train):,} chars; "
          f"held out {len(heldout)} docs / {sum(len(d.text) for d in heldout):,} chars", flush=True)

    heldout_text = join_documents(heldout)
    HELDOUT_PATH.write_text(heldout_text, encoding="utf-8")
    PACKAGE_DATA_DIR.mkdir(parents=True, exist_ok=True)
    calibration_text = join_documents(calibration_excerpt(train, CALIBRATION_CHARS, SEED))
    CALIBRATION_PATH.write_text(calibration_text, encoding="utf-8")
    print(f"wrote {HELDOUT_PATH.relative_to(REPO_ROOT)} ({len(heldout_text):,} chars) and "
          f"{CALIBRATION_PATH.relative_to(REPO_ROOT)} ({len(calibration_text):,} chars)", flush=True)

    tokenizer = train_tokenizer(train)
    train_ids = encode_documents(tokenizer, train)
    heldout_ids = encode_text(tokenizer, HELDOUT_PATH.read_text(encoding="utf-8"))
    unigram = unigram_perplexity(train_ids, heldout_ids)
    print(f"tokens: train {len(train_ids):,}, held out {len(heldout_ids):,}; "
          f"unigram held-out perplexity {unigram:.2f}", flush=True)

    results = {"unigram_heldout_perplexity": round(unigram, 3), "heldout_tokens": len(heldout_ids),
               "train_tokens": len(train_ids)}
    for kind in args.models:
        results[kind] = make_model(kind, tokenizer, train_ids, heldout_ids, args.max_minutes)
    print("\nresults: " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
