"""Activation calibration for the checkpoints' input scales (docs/checkpoints.md,
"Activation calibration").

The model runs once over the user's token ids (transformers'
AutoModelForCausalLM, torch forward pre-hooks on the Linear modules that are
quantized), on a CUDA device or on the CPU, and each Linear's input amax
(max |x| over every sample) is recorded, as ModelOpt's max calibration does for
its NVFP4 input quantizers. Each format then writes its own scale from that
amax (formats/*.py `input_scale_value`).

Token files (`--calibration-tokens FILE`), one sample per row:
- `.npy`: an integer array, 2-D (one row per sample) or 1-D (one sample);
- `.json`: a list of lists of integers (or one list: one sample);
- anything else: text, one sample per line, ids separated by whitespace
  (blank lines and lines starting with '#' are skipped).
Each sample runs alone (batch 1: no padding, no attention mask to get wrong).

The result is saved beside the checkpoint (CALIBRATION_FILE): the amax of each
Linear as measured, the tokens' sha256 and where it ran. `--calibration-amax
FILE` reads such a file instead of running the model (a split conversion
calibrates once), and `--resume` reuses the one in the output directory when
the tokens are the same, so resumed shards keep their scales."""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .source import CheckpointError

CALIBRATION_FILE = "nvfp4_cupy_calibration.json"


@dataclass
class Calibration:
    input_amax: dict[str, np.float32]  # module -> amax of its input, as measured (before fusion sharing)
    tokens_sha256: str
    samples: int
    tokens: int
    device: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        # float(np.float32) is exact, and json writes the shortest repr that reads back as the same float64
        return {"tokens_sha256": self.tokens_sha256, "samples": self.samples, "tokens": self.tokens,
                "device": self.device, **self.extra,
                "input_amax": {m: float(a) for m, a in sorted(self.input_amax.items())}}

    @classmethod
    def from_json(cls, value: dict, where) -> Calibration:
        try:
            amax = {str(m): np.float32(a) for m, a in value["input_amax"].items()}
            known = ("tokens_sha256", "samples", "tokens", "device", "input_amax")
            return cls(amax, str(value["tokens_sha256"]), int(value["samples"]), int(value["tokens"]),
                       str(value["device"]), {k: v for k, v in value.items() if k not in known})
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{where}: not a calibration file (written as {CALIBRATION_FILE} by convert)") from None


def read_calibration_file(path) -> Calibration:
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--calibration-amax {path}: cannot read ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"--calibration-amax {path}: not a calibration file (written as {CALIBRATION_FILE} by convert)")
    return Calibration.from_json(value, f"--calibration-amax {path}")


def as_samples(rows, where: str) -> list[list[int]]:
    samples = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise CheckpointError(f"{where}: sample {i} is not a list of integer token ids")
        if row:
            samples.append([int(t) for t in row])
    if not samples:
        raise CheckpointError(f"{where}: no token ids")
    negative = [t for s in samples for t in s if t < 0]
    if negative:
        raise CheckpointError(f"{where}: token ids must be >= 0, got {negative[0]}")
    return samples


def read_tokens(path) -> list[list[int]]:
    """The samples of a token file (see the module docstring)."""
    path = Path(path)
    where = f"--calibration-tokens {path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.dtype.kind not in "iu" or array.ndim not in (1, 2):
                raise CheckpointError(f"{where}: an integer array of 1 or 2 dimensions, got {array.dtype} {array.shape}")
            rows = [array.tolist()] if array.ndim == 1 else array.tolist()
        elif path.suffix == ".json":
            value = json.loads(path.read_text())
            if not isinstance(value, list):
                raise CheckpointError(f"{where}: a JSON list of lists of token ids")
            rows = [value] if value and all(isinstance(t, int) for t in value) else value
        else:
            rows = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    try:
                        rows.append([int(t) for t in line.split()])
                    except ValueError:
                        raise CheckpointError(f"{where}: line {n} is not whitespace-separated integer ids") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: cannot read ({exc})") from None
    return as_samples(rows, where)


def tokens_digest(samples: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(samples, separators=(",", ":")).encode()).hexdigest()


def _vocab_size(config: dict | None) -> int | None:
    for c in (config or {}, (config or {}).get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def _torch_device(torch, cpu: bool, device: int | None) -> str:
    if cpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise CheckpointError("calibration on the GPU needs torch with CUDA (torch.cuda.is_available() is False); "
                              "--cpu runs it on the CPU")
    index = device or 0
    if index >= torch.cuda.device_count():
        raise CheckpointError(f"--devices: torch sees no GPU {index}")
    return f"cuda:{index}"


def measure_input_amax(model_dir, samples: list[list[int]], modules, *, cpu: bool = False,
                       device: int | None = None, config: dict | None = None) -> Calibration:
    """Runs the model over `samples` and returns each module's input amax.
    Every module in `modules` must be an nn.Linear of the model that the
    tokens reach; anything else is an error naming the modules."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise CheckpointError(f"calibration needs torch and transformers ({exc})") from None
    vocab = _vocab_size(config)
    if vocab is not None:
        too_large = [t for s in samples for t in s if t >= vocab]
        if too_large:
            raise CheckpointError(f"--calibration-tokens: token id {too_large[0]} is not below the vocabulary size {vocab}")
    where = _torch_device(torch, cpu, device)
    # with accelerate, transformers puts each weight on the GPU as it loads it (host memory stays
    # small); without it the model is built in host memory and then moved
    direct = where != "cpu" and importlib.util.find_spec("accelerate") is not None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto",
                                                                  **({"device_map": where} if direct else {}))
        if not direct:
            model.to(where)
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"calibration: transformers' AutoModelForCausalLM cannot load {model_dir} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    try:
        wanted = set(modules)
        linears = {name: m for name, m in model.named_modules() if name in wanted and isinstance(m, torch.nn.Linear)}
        absent = sorted(wanted - set(linears))
        if absent:
            raise CheckpointError(f"calibration: {len(absent)} quantized weights are no torch.nn.Linear of the model "
                                  f"that transformers builds ({', '.join(absent[:4])}{', ...' if len(absent) > 4 else ''}); "
                                  "--exclude them or convert without calibration")
        running: dict[str, object] = {}

        def hook(name):
            def record(module, args, kwargs):
                x = args[0] if args else kwargs["input"]
                amax = x.detach().abs().amax()  # exact in the activation dtype; NaN propagates
                running[name] = amax if name not in running else torch.maximum(running[name], amax)
            return record

        handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in linears.items()]
        model.eval()
        try:
            with torch.no_grad():
                for sample in samples:
                    model(torch.tensor([sample], dtype=torch.long, device=where))
        except (RuntimeError, IndexError) as exc:
            raise CheckpointError(f"calibration: the forward pass failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        finally:
            for h in handles:
                h.remove()
        unreached = sorted(wanted - set(running))
        if unreached:
            raise CheckpointError(f"calibration: the tokens reached no input of {len(unreached)} quantized Linear "
                                  f"({', '.join(unreached[:4])}{', ...' if len(unreached) > 4 else ''}); give more "
                                  "samples, --exclude them, or convert without calibration")
        amax = {name: np.float32(value.float().cpu().item()) for name, value in running.items()}
        bad = sorted(name for name, a in amax.items() if not np.isfinite(a))
        if bad:
            raise CheckpointError(f"calibration: the activations are not finite at the input of {', '.join(bad[:4])} "
                                  f"({amax[bad[0]]}): the model overflows on these tokens")
        described = f"{where} ({torch.cuda.get_device_name(where)})" if where != "cpu" else "cpu"
        return Calibration(amax, tokens_digest(samples), len(samples), sum(map(len, samples)), described,
                           {"torch": torch.__version__, "transformers": transformers.__version__})
    finally:
        del model
        gc.collect()
        if where != "cpu":
            torch.cuda.empty_cache()
