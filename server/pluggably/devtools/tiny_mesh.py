"""Builds a tiny Shap-E text-to-3D pipeline, fully offline, for tests and the demo.

The pipeline draws noise, but it is a real `ShapEPipeline` folder laid out like `openai/shap-e`
on the Hub (`model_index.json` plus one subfolder per component, safetensors weights), so it
exercises every code path a real text-to-3D model does: tokenizing arbitrary prompts, the CLIP
text encoder with its projection, classifier-free guidance, the prior's Heun denoising loop, and
the renderer's marching-cubes mesh decoding with vertex colours.

    pluggably-make-tiny-mesh OUT_DIR [--force] [--seed N]

Design decisions:

- Everything is tiny (well under 1 MB): a one-layer prior over 32 latent vectors of width 16,
  and a renderer whose MLP is 8 wide, so a 4-step generation plus a 32^3 mesh decode takes a
  fraction of a second on a CPU.
- The renderer's marching-cubes tables are computed here (`marching_cubes_tables`): a freshly
  constructed `ShapERenderer` has all-zero tables and decodes nothing, while a real checkpoint
  carries them as buffers. Each of the 256 corner cases is triangulated from the loops its
  iso-surface cuts on the cube's faces, with one rule for the ambiguous faces (two diagonal
  inside corners are kept apart), so neighbouring cubes always agree on their shared face: the
  meshes are closed and consistently oriented (outward normals), at most 5 triangles a cube,
  the layout diffusers' `MeshDecoder` indexes (`cases[256, 5, 3]` edge ids, `masks[256, 5]`).
- A random renderer decodes an empty field or a solid box whatever the latents, so the renderer
  is shaped instead: its MLP computes a smooth radial field (a ball of radius about 0.6) and the
  latents, through the renderer's own parameter projection, only perturb it. Every latent gives a
  closed, non-empty, bumpy blob whose shape and colours depend on the prompt and the seed.
- The tokenizer is the tiny Stable Diffusion one (`tiny_image.write_tokenizer_files`): every byte
  is in the vocabulary, so any prompt tokenizes. The scheduler is Heun with Shap-E's own settings
  (`exp` betas over 1024 steps, Karras sigmas, predicting the sample, clipped to [-1, 1]).
- Deterministic: the same seed gives byte-identical weights; the torch RNG of the caller is left
  alone. The folder is built in a temporary sibling and moved into place, `model_index.json`
  last, so a reader never sees an index without its components.

Module import stays cheap: `torch`, `diffusers` and `transformers` are imported inside the
builder.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pluggably.devtools.tiny_image import _install, write_tokenizer_files
from pluggably.runners.shap_e_mesh import numpy_copy_warning_ignored

#: Like CLIP: prompts are padded or truncated to 77 tokens.
MAX_PROMPT_TOKENS = 77
TEXT_HIDDEN_SIZE = 32
TEXT_PROJECTION_SIZE = 32
#: Width of the renderer's MLP; the prior's latent holds one vector per row of its first four
#: weight matrices (4 x 8), each `LATENT_WIDTH` wide.
RENDERER_WIDTH = 8
LATENT_WIDTH = 16
LATENT_VECTORS = 4 * RENDERER_WIDTH
#: Radius of the ball the renderer's field describes before the latents perturb it.
BALL_RADIUS = 0.6

#: The files a complete pipeline folder holds (what `main` checks before skipping work).
PIPELINE_FILES = (
    "model_index.json",
    "README.md",
    "prior/config.json",
    "prior/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "shap_e_renderer/config.json",
    "shap_e_renderer/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
)

MODEL_CARD = """\
---
library_name: diffusers
pipeline_tag: text-to-3d
tags:
- tiny
- random
- testing
- shap-e
---

# Tiny random Shap-E pipeline

**This model makes noise.** Its meshes are random bumpy blobs: the weights are random
(seed {seed}) and were never trained. It exists to test software that runs text-to-3D pipelines,
offline and in a fraction of a second on a CPU: it has the layout and components of
`openai/shap-e`.

- `ShapEPipeline`: use `output_type="latent"` and `shap_e_renderer.decode_to_mesh`, or
  `output_type="mesh"`
- PriorTransformer (1 layer, {vectors} latent vectors of width {width}), CLIPTextModelWithProjection
  (hidden 32, 2 layers, projection 32), CLIPTokenizer (byte-level BPE, {max_tokens} tokens), Heun
  scheduler with Shap-E's settings
- ShapERenderer with an MLP {renderer} wide and valid marching-cubes tables: every latent
  decodes to a closed mesh around a ball of radius {radius}

Built by `pluggably-make-tiny-mesh` (`pluggably.devtools.tiny_mesh`).
"""

# ---- marching cubes -----------------------------------------------------------------------
#
# Corner `c` of a cube sits at (x, y, z) = (c & 1, c >> 1 & 1, c >> 2 & 1), as diffusers'
# `MeshDecoder` builds its case index (bit x + 2y + 4z set when the field there is > 0, inside).
# Edges are numbered the way its `_create_flat_edge_indices` lays out the grid's edges: the four
# along x, then the four along y, then the four along z.
CUBE_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1),
    (2, 3),
    (4, 5),
    (6, 7),
    (0, 2),
    (1, 3),
    (4, 6),
    (5, 7),
    (0, 4),
    (1, 5),
    (2, 6),
    (3, 7),
)
#: How many triangles `MeshDecoder` keeps room for in one cube.
MAX_CUBE_TRIANGLES = 5

Triangle = tuple[int, int, int]


def marching_cubes_tables() -> list[list[Triangle]]:
    """The triangles (as cube edge ids, outward-facing counter-clockwise) of each of the 256
    corner cases, for diffusers' `MeshDecoder` (see the module docstring)."""
    faces = _cube_faces()
    edge_of = {pair: index for index, pair in enumerate(CUBE_EDGES)}
    edge_faces = [
        frozenset(f for f, ring in enumerate(faces) if {a, b} <= set(ring)) for a, b in CUBE_EDGES
    ]
    table = []
    for case in range(256):
        inside = [bool(case >> c & 1) for c in range(8)]
        # Each face cuts the iso-line into segments from edge to edge, around each run of
        # inside corners: diagonal inside corners stay apart, whichever cube looks at the face.
        following: dict[int, int] = {}
        for ring in faces:
            for i in range(4):
                before, first = ring[i - 1], ring[i]
                if inside[first] and not inside[before]:
                    j = i
                    while inside[ring[(j + 1) % 4]]:
                        j += 1
                    last, after = ring[j % 4], ring[(j + 1) % 4]
                    start = edge_of[(min(before, first), max(before, first))]
                    following[start] = edge_of[(min(last, after), max(last, after))]
        triangles: list[Triangle] = []
        for loop in _loops(following):
            triangles += _triangulate(loop, edge_faces)
        if len(triangles) > MAX_CUBE_TRIANGLES:
            raise AssertionError(f"case {case} needs {len(triangles)} triangles")
        table.append(triangles)
    return table


def marching_cubes_buffers() -> tuple[Any, Any]:
    """`marching_cubes_tables` as the `cases` (long [256, 5, 3]) and `masks` (bool [256, 5])
    tensors of diffusers' `MeshDecoder`."""
    import torch

    cases = torch.zeros(256, MAX_CUBE_TRIANGLES, 3, dtype=torch.long)
    masks = torch.zeros(256, MAX_CUBE_TRIANGLES, dtype=torch.bool)
    for case, triangles in enumerate(marching_cubes_tables()):
        for slot, triangle in enumerate(triangles):
            cases[case, slot] = torch.tensor(triangle)
            masks[case, slot] = True
    return cases, masks


def _cube_faces() -> list[list[int]]:
    """The six faces as rings of corners, counter-clockwise seen from outside the cube."""
    faces = []
    for axis in range(3):
        u, v = (axis + 1) % 3, (axis + 2) % 3
        for side in (0, 1):
            ring = []
            for a, b in ((0, 0), (1, 0), (1, 1), (0, 1)):
                position = [0, 0, 0]
                position[axis], position[u], position[v] = side, a, b
                ring.append(position[0] + 2 * position[1] + 4 * position[2])
            faces.append(ring if side else ring[::-1])
    return faces


def _loops(following: dict[int, int]) -> Iterator[list[int]]:
    seen: set[int] = set()
    for start in sorted(following):
        if start in seen:
            continue
        loop = [start]
        edge = following[start]
        while edge != start:
            loop.append(edge)
            edge = following[edge]
        seen.update(loop)
        yield loop


def _triangulate(loop: list[int], edge_faces: list[frozenset[int]]) -> list[Triangle]:
    """A triangulation of `loop` without a diagonal across a cube face: the neighbouring cube
    could draw the same diagonal, and the edge would then have four triangles."""
    n = len(loop)

    def on_a_face(i: int, j: int) -> bool:
        adjacent = (j - i) % n in (1, n - 1)
        return not adjacent and bool(edge_faces[loop[i]] & edge_faces[loop[j]])

    for triangles in _triangulations(list(range(n))):
        if not any(on_a_face(a, b) for t in triangles for a, b in itertools.combinations(t, 2)):
            # Corners in loop order keep the loop's orientation (outward normals).
            return [(loop[a], loop[b], loop[c]) for a, b, c in (sorted(t) for t in triangles)]
    raise AssertionError(f"no face-free triangulation of {loop}")


def _triangulations(polygon: list[int]) -> Iterator[list[Triangle]]:
    if len(polygon) < 3:
        yield []
        return
    first, last = polygon[0], polygon[-1]
    for k in range(1, len(polygon) - 1):
        for left in _triangulations(polygon[: k + 1]):
            for right in _triangulations(polygon[k:]):
                yield [(first, polygon[k], last), *left, *right]


# ---- the pipeline ---------------------------------------------------------------------------


def build_tiny_mesh_pipeline(out: Path, *, seed: int = 0) -> Path:
    """Builds the tiny pipeline into `out` (created, existing components replaced); returns it.

    Deterministic: the same `seed` always gives byte-identical weights, configs and tokenizer.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build_into(tmp, seed)
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds every file a built tiny pipeline has."""
    return all((Path(folder) / name).is_file() for name in PIPELINE_FILES)


def _build_into(folder: Path, seed: int) -> None:
    import torch
    from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEPipeline
    from diffusers.pipelines.shap_e import ShapERenderer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer_src = folder / ".tokenizer-src"
    write_tokenizer_files(tokenizer_src)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_src, model_max_length=MAX_PROMPT_TOKENS)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN_SIZE,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=TEXT_PROJECTION_SIZE,
                max_position_embeddings=MAX_PROMPT_TOKENS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        # Shap-E's prior layout: no extra tokens, layer norms in and on the text projection; it
        # predicts a mean and a variance per latent value, hence twice the latent width out.
        prior = PriorTransformer(
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            embedding_dim=LATENT_WIDTH,
            num_embeddings=LATENT_VECTORS,
            additional_embeddings=0,
            time_embed_act_fn="gelu",
            norm_in_type="layer",
            embedding_proj_norm_type="layer",
            encoder_hid_proj_type=None,
            added_emb_type=None,
            time_embed_dim=64,
            embedding_proj_dim=TEXT_PROJECTION_SIZE,
            clip_embed_dim=2 * LATENT_WIDTH,
        )
        renderer = ShapERenderer(
            param_shapes=(
                (RENDERER_WIDTH, 93),
                (RENDERER_WIDTH, RENDERER_WIDTH),
                (RENDERER_WIDTH, RENDERER_WIDTH),
                (RENDERER_WIDTH, RENDERER_WIDTH),
            ),
            d_latent=LATENT_WIDTH,
            d_hidden=RENDERER_WIDTH,
            n_output=12,
            background=(255.0, 255.0, 255.0),
        )
        _shape_renderer(renderer)
    text_encoder.eval()
    with numpy_copy_warning_ignored():  # Heun sets its default timesteps on construction
        scheduler = HeunDiscreteScheduler(
            beta_schedule="exp",
            num_train_timesteps=1024,
            prediction_type="sample",
            use_karras_sigmas=True,
            clip_sample=True,
            clip_sample_range=1.0,
        )
    # Any: diffusers' type hints hide the mixin that gives `save_pretrained`.
    pipeline: Any = ShapEPipeline(
        prior=prior,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        shap_e_renderer=renderer,
    )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for name in ("vocab.json", "merges.txt"):
        os.replace(tokenizer_src / name, folder / "tokenizer" / name)
    shutil.rmtree(tokenizer_src)
    (folder / "README.md").write_text(
        MODEL_CARD.format(
            seed=seed,
            vectors=LATENT_VECTORS,
            width=LATENT_WIDTH,
            max_tokens=MAX_PROMPT_TOKENS,
            renderer=RENDERER_WIDTH,
            radius=BALL_RADIUS,
        ),
        encoding="utf-8",
    )


# Positional-encoding columns of the renderer's first layer that the latents may weigh in: the
# raw position and the sines at the two lowest frequencies (diffusers' `posenc_nerf` lays out
# [x y z, sin(2^k x, 2^k y, 2^k z) for k < 15, the same with cos]). They vary slowly over the
# [-1, 1] cube, so the blob stays smooth at any grid size, and all vanish at the centre.
_ODD_SMOOTH_COLUMNS = tuple(range(0, 9))
# Scale of the axis units of the first layer, and how much the latents perturb the first layer
# and the next three.
_AXIS_SCALE = 3.0
_POSITION_PERTURBATION = 0.3
_PERTURBATION = 0.15
_SDF_SLOPE = 8.0
_COLOUR_GAIN = 4.0


def _shape_renderer(renderer: Any) -> None:
    """Gives the renderer its marching-cubes tables, and makes its field a ball perturbed by the
    latents (see the module docstring).

    The renderer builds its first four MLP weight matrices from the latent: for each matrix,
    `LayerNorm(latent rows @ proj) * gamma + beta + proj.bias`. The layer norm bounds the latents'
    share whatever their scale, so `proj.bias` carries the fixed ball and `gamma` the bumps.
    Units 0-5 of the first layer see +-x, +-y, +-z; unit 0 of the next layers carries their sum,
    an even, radially growing function (silu(s) + silu(-s) = s tanh(s / 2)); the signed
    distance decreases with it and crosses zero near `BALL_RADIUS`. The other units carry the
    axis units on, the latents mix them, and the colours read them.

    Never empty: the first layer sees only inputs that vanish at the centre and every bias of the
    hidden layers is zero, so at the centre every hidden unit is 0 whatever the latent, and the
    signed distance there is `_SDF_SLOPE * _radial_unit(BALL_RADIUS)` > 0.
    """
    import torch

    mlp = renderer.mlp.mlp
    projections = renderer.params_proj.projections
    cases, masks = marching_cubes_buffers()
    with torch.no_grad():
        renderer.mesh_decoder.cases.copy_(cases)
        renderer.mesh_decoder.masks.copy_(masks)
        for index in range(4):
            projection = projections[f"nerstf__mlp__{index}__weight"]
            fixed = torch.zeros(projection.vectors, projection.channels)
            gamma = torch.full((projection.channels,), _PERTURBATION)
            if index == 0:
                for unit, (axis, sign) in enumerate(itertools.product(range(3), (1.0, -1.0))):
                    fixed[unit, axis] = sign * _AXIS_SCALE
                gamma = torch.zeros(projection.channels)
                gamma[list(_ODD_SMOOTH_COLUMNS)] = _POSITION_PERTURBATION
            elif index == 1:
                fixed[0, :6] = 1.0
                for unit in range(1, projection.vectors):  # the rest: the axis units, shifted
                    fixed[unit, unit - 1] = 1.0
            else:
                fixed = torch.eye(projection.vectors, projection.channels)
            projection.proj.bias.copy_(fixed.reshape(-1))
            projection.norm.weight.copy_(gamma)
            projection.norm.bias.zero_()
            mlp[index].bias.zero_()
        for index in (4, 5):  # pass everything on (layer 4 also sees the unused direction)
            mlp[index].weight.copy_(torch.eye(*mlp[index].weight.shape))
            mlp[index].bias.zero_()
        # The signed distance: positive inside, zero where the radial unit reaches its value at
        # the ball's surface (the chain of silus is increasing there, so the order holds).
        surface = _radial_unit(BALL_RADIUS)
        mlp[6].weight[0].zero_()
        mlp[6].weight[0, 0] = -_SDF_SLOPE
        mlp[6].bias[0] = _SDF_SLOPE * surface
        # Colours (the `stf` outputs 3-5, through a sigmoid): strong enough to tell blobs apart.
        mlp[6].weight[3:6].normal_(0.0, _COLOUR_GAIN)
        mlp[6].bias[3:6].zero_()


def _radial_unit(radius: float) -> float:
    """Unit 0 after the last hidden layer, unperturbed, at distance `radius` along an axis."""
    value = radius * _AXIS_SCALE * math.tanh(radius * _AXIS_SCALE / 2)  # the other axes give 0
    for _ in range(5):  # hidden layers 1-5 pass it on through a silu each
        value = value / (1 + math.exp(-value))
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pluggably-make-tiny-mesh",
        description=(
            "Build a tiny random Shap-E text-to-3D pipeline (offline, under 1 MB, meshes of "
            "noisy blobs) for tests and demos."
        ),
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline into")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the folder holds a pipeline"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the random weights (default 0)"
    )
    args = parser.parse_args(argv)

    out_dir: Path = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"{out_dir} exists and is not a folder")
    if args.force or not is_complete(out_dir):
        build_tiny_mesh_pipeline(out_dir, seed=args.seed)
    print(out_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
