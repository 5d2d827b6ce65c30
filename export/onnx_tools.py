"""torch-free tools on ONNX files: check and stamp, describe I/O, find the bottleneck, convert to fp16.

Used by the export (`graphs`), the int8 variant (`quantize`), the TensorRT build (`tensorrt_build`)
and the benchmarks; needs ``onnx`` (and, for `make_fp16_onnx`, ``onnxruntime.transformers``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .manifest import ExportError

ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16", 6: "int32"}
BOTTLENECK_FROM = "z"  # the encoder output whose consumers form the bottleneck


def finalise_onnx(path: Path, metadata: dict[str, str]) -> None:
    """Check the graph, refuse external data, stamp metadata, save as one self-contained file."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if uses_external_data(t)]
    if external:
        raise ExportError(f"{path.name}: {len(external)} initializers use external data; expected one file")
    for p in list(path.parent.iterdir()):  # a sidecar written by the exporter (there should be none)
        if p.name.startswith(path.name) and p != path:
            raise ExportError(f"exporter wrote an external-data sidecar {p.name}; expected one self-contained file")
    del model.metadata_props[:]
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def graph_io(path: str | os.PathLike) -> dict[str, Any]:
    """Names, shapes (dim names for dynamic axes) and dtypes of a graph's inputs and outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            out.append({"name": v.name, "shape": dims, "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type))})
        return out

    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output), "opset": opset}


def bottleneck_nodes(model, tensor: str = BOTTLENECK_FROM) -> list[str]:
    """Names of the ONNX nodes that do not contribute to ``tensor`` (the encoder output ``z``): the
    bottleneck (distances, softmax, argmax) and its codebook branch."""
    producer = {o: n for n in model.graph.node for o in n.output}
    needed, stack = set(), [tensor]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(node.input)
    return [n.name for n in model.graph.node if n.name not in needed]


def make_fp16_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, keep_fp32_from: str | None = None) -> Path:
    """Write an fp16 copy of ONNX graph ``src`` with fp32 inputs/outputs.

    Nodes that do not contribute to tensor ``keep_fp32_from`` (the encoder's bottleneck) stay fp32.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise ExportError(
            "an fp16 ONNX graph is needed (TensorRT >= 11 builds strongly typed networks only) but "
            "onnxruntime.transformers.float16 is not importable; install onnxruntime (or onnxruntime-gpu) "
            "or convert the graph with NVIDIA ModelOpt AutoCast"
        ) from e
    model = onnx.load(str(src))
    block = bottleneck_nodes(model, keep_fp32_from) if keep_fp32_from else []
    fp16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=block)
    _topological_sort(fp16.graph)  # the converter appends its input casts at the end
    onnx.checker.check_model(fp16)
    onnx.save(fp16, str(dst))
    return Path(dst)


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` in place so that every node follows the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)
