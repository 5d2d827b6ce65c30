"""Which layers of the export's graphs run in int8, per layer policy; and the per-layer error budget
the ``safe`` policy comes from (torch-free).

The policies (`vqdiff.engine.LAYER_POLICIES`) on the ONNX graphs, by the position of each
convolution (``Conv`` / ``ConvTranspose`` nodes in graph order: the order of
`vqdiff.torch_engine.layer_names` within the encoder and the decoder, whatever the exporter named
them). ``trunk`` / ``encoder`` / ``decoder`` are `quantize.quantize_graph`'s ``fp32_edges`` recipe
(the variants ``ort-int8*``); ``safe`` quantises only the layers of `INT8_SAFE`.

The budget (`INT8_BUDGET_MM`, `BF16_BUDGET_MM`): the change of the mean MDF (mm) on the 48 held-out
real subject01 groups (`gate.gate_groups`, seed 0) when that one layer alone runs in int8 (ONNX
Runtime static QDQ, per-channel int8 weights, uint8 per-tensor activations, MinMax on the 32
calibration groups) or in bf16 (torch, an autocast island on an fp32 model, emulated on the AVX2
machine it was measured on), against the fp32 model's 0.595 mm; the mean BUAN changed by at most
0.0004 for any one layer. Measured with ``benchmarks/bench_layers.py`` on the bundled default model.
A layer enters `INT8_SAFE` when its own change is at most `SAFE_SHARE` of the gate's 0.05 mm.
"""

from __future__ import annotations

from .gate import MAX_MDF_CHANGE_MM

SAFE_SHARE = 0.25  # a layer's own int8 change may use at most a quarter of the gate to be "safe"

# torch layer name -> Δ mean MDF (mm) with that layer alone in int8 / bf16 (see the module docstring)
INT8_BUDGET_MM = {
    "encoder.net.0": 0.2391, "encoder.net.2": 0.0907, "encoder.net.4": 0.1275,
    "encoder.net.5.layers.0.block.1": 0.0108, "encoder.net.5.layers.0.block.3": 0.0002,
    "encoder.net.5.layers.1.block.1": 0.0111, "encoder.net.5.layers.1.block.3": 0.0005, "encoder.net.6": 0.0617,
    "decoder.net.0": 0.1026, "decoder.net.1.layers.0.block.1": 0.0172, "decoder.net.1.layers.0.block.3": 0.0249,
    "decoder.net.1.layers.1.block.1": 0.0179, "decoder.net.1.layers.1.block.3": 0.0031, "decoder.net.2": 0.4481,
    "decoder.net.4": 0.4490,
}
BF16_BUDGET_MM = {
    "encoder.net.0": 0.0115, "encoder.net.2": 0.0025, "encoder.net.4": 0.0043,
    "encoder.net.5.layers.0.block.1": 0.0000, "encoder.net.5.layers.0.block.3": 0.0000,
    "encoder.net.5.layers.1.block.1": 0.0000, "encoder.net.5.layers.1.block.3": 0.0000, "encoder.net.6": 0.0032,
    "decoder.net.0": 0.0026, "decoder.net.1.layers.0.block.1": 0.0000, "decoder.net.1.layers.0.block.3": 0.0000,
    "decoder.net.1.layers.1.block.1": 0.0000, "decoder.net.1.layers.1.block.3": 0.0000, "decoder.net.2": 0.0313,
    "decoder.net.4": 0.0643,
}


def _safe(graph: str) -> tuple[int, ...]:
    names = [n for n in INT8_BUDGET_MM if n.startswith(graph + ".")]
    return tuple(i for i, n in enumerate(names) if INT8_BUDGET_MM[n] <= SAFE_SHARE * MAX_MDF_CHANGE_MM)


# graph -> positions (among its Conv / ConvTranspose nodes) the "safe" policy quantises
INT8_SAFE = {"encoder": _safe("encoder"), "decoder": _safe("decoder")}


def conv_nodes(model) -> list[str]:
    """The names of an ONNX model's Conv / ConvTranspose nodes, in graph order."""
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]


def int8_nodes(model, graph: str, positions=None) -> list[str]:
    """The nodes of ``graph`` ("encoder" / "decoder") the ``safe`` policy quantises (or ``positions``)."""
    nodes = conv_nodes(model)
    positions = INT8_SAFE[graph] if positions is None else positions
    if positions and max(positions) >= len(nodes):
        raise ValueError(f"the {graph} graph has {len(nodes)} convolutions, not the {max(positions) + 1}+ "
                         "the int8 layer policy was measured on (another architecture: measure its budget)")
    return [nodes[i] for i in positions]
