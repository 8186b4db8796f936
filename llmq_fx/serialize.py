"""Save and reload a quantized graph through ``torch.export``'s own program format (``.pt2``).

``save(qgm, path)`` exports the rewritten GraphModule again (``torch.export.export``, batch and
sequence dynamic as at capture) and writes it with ``torch.export.save``; its quantization record
(``qgm.meta["llmq_fx"]``: config, recipe, per-Linear records, reports; not the per-channel
statistics, which ``llmq-fx quantize`` writes to ``stats.safetensors``) travels inside the archive as
``extra/llmq_fx.json``, with the llmq_fx version that wrote it. ``load(path)`` returns a GraphModule
that computes what ``qgm`` computed, bit for bit, with that record in its meta, so a quantized model
can be inspected, evaluated and exported again without recalibrating.

Loading is safe: ``torch.export.load`` unpickles some archive entries (tensor subclasses, custom
objects, and the sample inputs if a weights-only load of them fails). ``load`` reads the archive's
index first and refuses any file with such an entry, so what it loads is plain tensor bytes and the
graph's JSON. The ``llmq`` ops the graph calls are registered by importing llmq_fx. A file written by
another llmq_fx version is refused with both versions named.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import fx
from torch.export import Dim

from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq, which the saved graph calls)
from llmq_fx.errors import CheckpointError, ExportError

__all__ = ["save", "load", "GRAPH_FILE"]

logger = logging.getLogger(__name__)

# The file name ``llmq-fx quantize`` writes into its output folder.
GRAPH_FILE = "graph.pt2"
_EXTRA = "llmq_fx.json"
_FORMAT = 1
# Per-channel statistics stay out of the archive (tensors, written to stats.safetensors by the CLI).
_NOT_SAVED = ("site_stats",)


def _version() -> str:
    from llmq_fx import __version__

    return __version__


def save(qgm: fx.GraphModule, path: str | os.PathLike, example_input_ids: torch.Tensor | None = None) -> Path:
    """Write ``qgm`` (a ``llmq_fx.quantize`` or ``llmq_fx.trace`` result) to a ``.pt2`` file.

    Args:
        qgm: the graph to save; its parameters and buffers are saved on their device.
        path: the file to write (a temporary file next to it is renamed into place at the end).
        example_input_ids: ids to trace the re-export with; by default zeros ``[2, 8]``.

    Returns:
        The path written.

    Raises:
        ExportError: the graph cannot be re-exported or the file cannot be written; nothing is left.

    Example:
        >>> llmq_fx.save(qgm, "runs/opt-mini/graph.pt2")
        >>> qgm2 = llmq_fx.load("runs/opt-mini/graph.pt2")
    """
    path = Path(path)
    meta = qgm.meta.get("llmq_fx", {})
    if example_input_ids is None:
        device = next((p.device for p in qgm.parameters()), torch.device("cpu"))
        example_input_ids = torch.zeros((2, 8), dtype=torch.long, device=device)
    max_len = meta.get("max_seq_len")
    seq = Dim("seq", min=1, max=max_len) if max_len else Dim("seq", min=1)
    try:
        with torch.no_grad():
            program = torch.export.export(
                qgm, (example_input_ids,), strict=False, dynamic_shapes=({0: Dim("batch", min=1), 1: seq},)
            )
    except Exception as err:  # torch.export raises many types; one message, naming the file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ExportError(f"cannot save the graph to {path}: torch.export failed: {first}") from err
    record = {
        "format": _FORMAT,
        "llmq_fx_version": _version(),
        "torch_version": torch.__version__,
        "meta": {k: v for k, v in meta.items() if k not in _NOT_SAVED},
    }
    try:
        text = json.dumps(record, default=_json_default)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.export.save(program, tmp, extra_files={_EXTRA: text})
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private; the saved graph is an ordinary file
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        raise ExportError(f"cannot write {path}: {err}") from err
    logger.info("saved %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Load a graph written by ``save``: a GraphModule ``input_ids -> logits`` with its record in
    ``gm.meta["llmq_fx"]`` (``llmq_fx.summary`` works on it).

    Raises:
        CheckpointError: naming the file, when it is missing, not a ``.pt2`` archive of llmq_fx,
            written by another llmq_fx version, or holds entries only unpickling could load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"graph file not found: {path}")
    record = _read_record(path)
    if record.get("llmq_fx_version") != _version() or record.get("format") != _FORMAT:
        raise CheckpointError(
            f"{path} was saved by llmq_fx {record.get('llmq_fx_version')} (format {record.get('format')}); this is "
            f"llmq_fx {_version()} (format {_FORMAT}): quantize the model again, or load the file with that version"
        )
    _check_no_pickle(path)
    try:
        program = torch.export.load(str(path))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(f"cannot load the graph in {path}: {first}") from err
    gm = program.module()
    gm.meta["llmq_fx"] = record.get("meta", {})
    return gm


def _read_record(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{_EXTRA}")]
            if not names:
                raise CheckpointError(f"{path} is a .pt2 archive but not one written by llmq_fx.save (no extra/{_EXTRA})")
            return json.loads(archive.read(names[0]).decode("utf-8"))
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path} is not a .pt2 archive (not a zip file, or truncated)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: its llmq_fx record is unreadable ({err})") from None


def _check_no_pickle(path: Path) -> None:
    """Refuse archives with any entry ``torch.export.load`` would unpickle (see the module docstring)."""
    from torch.export.pt2_archive import constants as c

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path} holds {what}, which loading would unpickle; refusing to load it")

    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        def under(name: str, folder: str) -> bool:
            return f"/{folder}" in f"/{name}"

        for name in names:
            is_config = name.endswith("_config.json") and (under(name, c.WEIGHTS_DIR) or under(name, c.CONSTANTS_DIR))
            if not is_config:
                continue
            config = json.loads(archive.read(name)).get("config", {})
            for fqn, entry in config.items():
                if entry.get("use_pickle"):
                    raise refuse(f"a pickled tensor ({fqn})")
                if not str(entry.get("path_name", "")).startswith((c.WEIGHT_FILENAME_PREFIX, c.TENSOR_CONSTANT_FILENAME_PREFIX)):
                    raise refuse(f"a non-tensor constant ({fqn})")
        for name in names:
            if name.endswith(".pt") and under(name, c.CONSTANTS_DIR):
                raise refuse(f"a legacy pickled constants file ({name})")
            if under(name, c.SAMPLE_INPUTS_DIR):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:
                    raise refuse(f"sample inputs that need a full unpickling ({name})") from None


def _json_default(v):
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() <= 64 else f"<tensor {tuple(v.shape)}>"
    return str(v)
