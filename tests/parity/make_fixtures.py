"""Parity fixtures: small modules of the official code, run on seeded inputs, saved as numbers
(tests/fixtures/parity/<name>.pt) for tests/test_parity.py to compare our modules with.

Run by hand, not by CI (it needs a local git mirror of the official repository; the test suite
needs only the saved numbers). The official source is read from the mirror with `git show` and
executed in memory; nothing of it is copied into this repository.

    git clone --mirror https://github.com/sukjunhwang/VITA MIRRORS/VITA.git
    git clone --mirror https://github.com/yz93/LAVT-RIS MIRRORS/LAVT-RIS.git
    git clone --mirror https://github.com/heshuting555/DsHmp MIRRORS/DsHmp.git
    git clone --mirror https://github.com/nero1342/VATEX MIRRORS/VATEX.git
    git clone --mirror https://github.com/RElbers/info-nce-pytorch MIRRORS/info-nce-pytorch.git
    python tests/parity/make_fixtures.py --vita MIRRORS/VITA.git --lavt MIRRORS/LAVT-RIS.git \\
        --dshmp MIRRORS/DsHmp.git --vatex MIRRORS/VATEX.git \\
        --info-nce MIRRORS/info-nce-pytorch.git

MIRRORS is a folder of your choice outside the repository. Each fixture holds: the repository,
commit and file, the module's sizes and its state dict under the official key names (seeded
random weights) where it has weights, and the inputs and the outputs (fp32, CPU).

Written so far: vita_module.pt, the VITA module (vita/modeling/transformer_decoder/vita.py: the
Object Encoder in training and at test with plain and shifted windows, the Object Decoder, the
class, mask-embedding and similarity heads); vita_full.pt, VITA's whole inference path (the
official `Vita.inference` of vita/vita_model.py: Swin, the deformable pixel decoder with the
official pure-PyTorch sampling, Mask2Former's decoder on every frame, the VITA module, video
logits and masks); lavt.pt, LAVT's language-aware Swin with PWAM and the
gates (lib/backbone.py), its decoder (lib/mask_predictor.py) and its weighted cross-entropy
(train.py's criterion); dshmp.pt, DsHmp's matching of adjacent frames (Eq. 3) and its frame
attention and weights (Eqs. 4-5); vatex.pt, VATEX's BAT (Eqs. 2-3) as the CMD calls it;
vatex_cmd.pt, VATEX's whole CMD (vatex/modeling/pixel_decoder/cmd.py: early BATs, deformable
encoder with the official pure-PyTorch sampling, the four levels' BATs and FPN convs, mask
features, the updated words) on words without padding; vatex_decoder.pt, VATEX's masked-attention
decoder (vatex/modeling/transformer_decoder/vatext_trans_decoder.py: the sentence-feature
queries, the CLIP prior added after the first prediction, the visual and word cross-attention,
the masks and class logits of every layer) on padded words, with and without the prior;
vatex_mcc.pt, the official MCC loss (vatex/modeling/criterion.py, `loss_contrastive`: the
symmetric InfoNCE of the `info-nce-pytorch` package its requirements.txt names) and its
gradient, on one process. The detectron2, fvcore, timm and mmseg names the official files import
are stand-ins (install_stand_ins).
"""
import argparse
import ast
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "parity"


def official_source(mirror: str, path: str, commit: str = "HEAD") -> tuple[str, str]:
    """(the file's text at `commit`, the full commit hash) from a git mirror."""
    git = ["git", f"--git-dir={mirror}"]
    full = subprocess.run([*git, "rev-parse", commit], capture_output=True, text=True, check=True)
    text = subprocess.run([*git, "show", f"{commit}:{path}"], capture_output=True, text=True,
                          check=True)
    return text.stdout, full.stdout.strip()


def install_stand_ins() -> None:
    """detectron2.config.configurable, detectron2.layers.Conv2d and fvcore's c2_xavier_fill, as
    far as the official modules use them: the constructors are called with explicit arguments, so
    `configurable` passes them through; Conv2d takes detectron2's extra norm / activation."""
    def configurable(init):
        return init

    class Conv2d(nn.Conv2d):
        def __init__(self, *args, norm=None, activation=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.norm, self.activation = norm, activation

        def forward(self, x):
            x = super().forward(x)
            x = self.norm(x) if self.norm is not None else x
            return self.activation(x) if self.activation is not None else x

    def c2_xavier_fill(module):  # fvcore: kaiming_uniform_(a=1), zero bias
        nn.init.kaiming_uniform_(module.weight, a=1)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)

    modules = {name: types.ModuleType(name) for name in (
        "detectron2", "detectron2.config", "detectron2.layers", "fvcore", "fvcore.nn",
        "fvcore.nn.weight_init")}
    modules.update({name: types.ModuleType(name) for name in (
        "timm", "timm.models", "timm.models.layers", "mmseg", "mmseg.utils", "lavt_lib",
        "lavt_lib.mmcv_custom")})
    layers = modules["timm.models.layers"]  # LAVT's Swin: drop path 0 here, so never applied
    layers.DropPath = lambda p: nn.Identity()
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    modules["mmseg.utils"].get_root_logger = lambda: None
    modules["lavt_lib.mmcv_custom"].load_checkpoint = None  # only for pretrained weights
    modules["lavt_lib"].__path__ = []
    modules.update({name: types.ModuleType(name) for name in ("dshmp_lib", "dshmp_lib.fuse_modules")})
    modules["dshmp_lib"].__path__ = []
    modules["vatex_attention"] = types.ModuleType("vatex_attention")
    modules["vatex_attention"].__path__ = []
    modules["dshmp_lib.fuse_modules"].BiAttentionBlock = None  # not in the modules compared
    modules["detectron2.config"].configurable = configurable
    modules["detectron2.layers"].Conv2d = Conv2d
    modules["fvcore.nn.weight_init"].c2_xavier_fill = c2_xavier_fill
    modules["fvcore.nn"].weight_init = modules["fvcore.nn.weight_init"]
    sys.modules.update(modules)


def load_official(mirror: str, path: str, name: str, package: str = ""):
    """Execute the official file as module `name` (in `package`, for its relative imports);
    returns (module, commit)."""
    text, commit = official_source(mirror, path)
    module = types.ModuleType(name)
    module.__package__ = package
    exec(compile(text, f"{Path(mirror).name}:{path}", "exec"), module.__dict__)
    return module, commit


# The VITA module at a small size: C = 32, 4 heads, FFN 64, Q = 5 frame queries, V = 4 video
# queries, 3 + 1 classes, mask width 16; the cases vary the clip length T against the window K.
VITA_SIZES = dict(hidden_dim=32, num_frame_queries=5, num_queries=4, nheads=4, dim_feedforward=64,
                  enc_layers=3, dec_layers=3, num_classes=3, conv_dim=32, mask_dim=16)
VITA_CASES = {  # name: (T frames, window K, training)
    "vita_module_train_T6_K3": (6, 3, True),
    "vita_module_train_T5_K3": (5, 3, True),  # T not a multiple of K: one padding frame
    "vita_module_test_T7_K3": (7, 3, False),  # at test the odd layers use shifted windows
    "vita_module_test_T2_K3": (2, 3, False),  # a clip shorter than one window
    "vita_module_test_T8_K4": (8, 4, False),
}


def make_vita(mirror: str) -> None:
    """One module (seeded weights, the same for every case: the sizes do not depend on T or K) and
    its outputs on each case's clip; saved as vita_module.pt."""
    vita, commit = load_official(mirror, "vita/modeling/transformer_decoder/vita.py",
                                 "official_vita")
    cases, state_dict = {}, None
    for name, (T, window, training) in VITA_CASES.items():
        torch.manual_seed(0)
        args = dict(in_channels=VITA_SIZES["hidden_dim"], aux_loss=True, **VITA_SIZES,
                    enc_window_size=window, pre_norm=False, enforce_input_project=True,
                    num_frames=T, clip_last_layer_num=False, sim_use_clip=True, use_sim=True)
        module = vita.VITA(**args).train(training)
        perturb(module)
        if state_dict is None:
            state_dict = module.state_dict()
        assert all(torch.equal(v, state_dict[k]) for k, v in module.state_dict().items())
        B = 2 if training else 1  # the official test path takes one clip
        frame_query = torch.randn(1, B * T, VITA_SIZES["num_frame_queries"],
                                  VITA_SIZES["hidden_dim"])  # (L = 1 layer, B*T, Q, C)
        with torch.no_grad():
            out = module(frame_query)
        cases[name] = {
            "frames": T, "window": window, "training": training, "clips": B,
            "frame_query": frame_query,
            "pred_logits": out["pred_logits"][0],  # (B, V, K+1)
            "pred_mask_embed": out["pred_mask_embed"][0],  # (B, V, mask_dim)
            "pred_fq_embed": out["pred_fq_embed"][0],  # (B, T, Q, C)
            "pred_cq_embed": out["pred_cq_embed"][0],  # (B, V, C)
            "aux_logits": [a["pred_logits"][0] for a in out["aux_outputs"]],  # training only
        }
    save("vita_module", repo="sukjunhwang/VITA", commit=commit,
         path="vita/modeling/transformer_decoder/vita.py", sizes=VITA_SIZES,
         state_dict=state_dict, cases=cases)


# VITA's whole inference path at a small size: a Swin of embed 8 (depths 2-2-2-2, heads 1-2-2-4,
# window 5: every stage's map is padded to whole windows), the deformable pixel decoder (2 layers,
# 4 heads, FFN 64), Mask2Former's decoder (HIDDEN_DIM = CONVS_DIM 32, MASK_DIM 16, 6 queries,
# DEC_LAYERS 4, 3 + 1 classes) and the VITA module (2 + 2 layers, 4 video queries, window 2 over 3
# frames: one padded frame, the second layer shifted), on 3 frames of 64x96 run in chunks of 2.
# The keys are build_vita's (common/vita.py SWIN_L_OVIS, whose comment gives their config names).
VITA_FULL_SIZES = dict(embed_dim=8, depths=(2, 2, 2, 2), swin_heads=(1, 2, 2, 4), window=5,
                       conv_dim=32, mask_dim=16, pixel_decoder_layers=2, pixel_decoder_heads=4,
                       pixel_decoder_ffn=64, hidden=32, heads=4, ffn=64, frame_queries=6,
                       dec_layers=3, num_classes=3, enc_layers=2, vita_dec_layers=2,
                       video_queries=4, enc_window=2)
VITA_FULL_FRAMES = dict(frames=3, height=64, width=96, chunk=2)


def load_official_vita_model(mirror: str):
    """The official meta-architecture (vita/vita_model.py `Vita`) and the modules it chains,
    executed from the mirror: mask2former/ as the package `mask2former` (VITA's files import it by
    that name), vita/ as `vita_official`. Returns ({name: module}, commit). Stand-ins: the detectron2
    names these files import (registries, Backbone, ShapeSpec, get_norm "GN" = GroupNorm(32),
    ImageList.from_tensors padding to the size divisibility, retry_if_cuda_oom as a plain call),
    the training criteria and matchers (not used at inference), and the compiled
    MultiScaleDeformableAttention op, replaced by the official pure-PyTorch
    `ms_deform_attn_core_pytorch` (ops/functions/ms_deform_attn_func.py)."""
    from collections import namedtuple

    import torch.nn.functional as F

    class Registry:
        def __init__(self, name=""):
            self.name = name

        def register(self, obj=None):
            return (lambda cls: cls) if obj is None else obj

    class ImageList:
        def __init__(self, tensor, image_sizes):
            self.tensor, self.image_sizes = tensor, image_sizes

        @staticmethod
        def from_tensors(tensors, size_divisibility=0):
            sizes = [tuple(t.shape[-2:]) for t in tensors]
            d = max(size_divisibility, 1)
            H, W = (-(-max(s[i] for s in sizes) // d) * d for i in (0, 1))
            return ImageList(torch.stack([F.pad(t, (0, W - t.shape[-1], 0, H - t.shape[-2]))
                                          for t in tensors]), sizes)

    shape_spec = namedtuple("ShapeSpec", "channels height width stride", defaults=(None,) * 4)
    names = ("detectron2.modeling", "detectron2.modeling.backbone", "detectron2.utils",
             "detectron2.utils.registry", "detectron2.utils.memory", "detectron2.data",
             "detectron2.structures", "MultiScaleDeformableAttention",
             "mask2former.modeling.criterion", "mask2former.modeling.matcher",
             "vita_official.modeling.vita_criterion", "vita_official.modeling.vita_matcher")
    stand_ins = {name: types.ModuleType(name) for name in names}
    modeling = stand_ins["detectron2.modeling"]
    modeling.Backbone = stand_ins["detectron2.modeling.backbone"].Backbone = \
        type("Backbone", (nn.Module,), {})
    modeling.ShapeSpec = shape_spec
    for name in ("BACKBONE_REGISTRY", "SEM_SEG_HEADS_REGISTRY", "META_ARCH_REGISTRY"):
        setattr(modeling, name, Registry(name))
    modeling.build_backbone = modeling.build_sem_seg_head = None  # built by hand below
    stand_ins["detectron2.utils.registry"].Registry = Registry
    stand_ins["detectron2.utils.memory"].retry_if_cuda_oom = lambda function: function
    stand_ins["detectron2.data"].MetadataCatalog = None
    structures = stand_ins["detectron2.structures"]
    structures.ImageList = ImageList
    structures.Boxes = structures.Instances = structures.BitMasks = None  # COCO / training only
    stand_ins["mask2former.modeling.criterion"].SetCriterion = None
    stand_ins["mask2former.modeling.matcher"].HungarianMatcher = None
    stand_ins["vita_official.modeling.vita_criterion"].VitaSetCriterion = None
    stand_ins["vita_official.modeling.vita_matcher"].VitaHungarianMatcher = None
    layers = sys.modules["detectron2.layers"]
    layers.ShapeSpec = shape_spec
    layers.get_norm = lambda norm, channels: {"GN": lambda: nn.GroupNorm(32, channels)}[norm]()
    layers.DeformConv = None  # fpn.py's deformable pixel decoders, not built
    sys.modules.update(stand_ins)
    for package in ("mask2former", "mask2former.modeling", "mask2former.modeling.backbone",
                    "mask2former.modeling.pixel_decoder", "mask2former.modeling.pixel_decoder.ops",
                    "mask2former.modeling.transformer_decoder", "mask2former.modeling.meta_arch",
                    "vita_official", "vita_official.modeling"):
        sys.modules[package] = types.ModuleType(package)
        sys.modules[package].__path__ = []
    files = ["mask2former/modeling/transformer_decoder/position_encoding.py",
             "mask2former/modeling/transformer_decoder/transformer.py",
             "mask2former/modeling/transformer_decoder/maskformer_transformer_decoder.py",
             "mask2former/modeling/pixel_decoder/ops/functions/ms_deform_attn_func.py",
             "mask2former/modeling/pixel_decoder/ops/functions/__init__.py",
             "mask2former/modeling/pixel_decoder/ops/modules/ms_deform_attn.py",
             "mask2former/modeling/pixel_decoder/ops/modules/__init__.py",
             "mask2former/modeling/pixel_decoder/msdeformattn.py",
             "mask2former/modeling/pixel_decoder/fpn.py",
             "mask2former/modeling/backbone/swin.py",
             "mask2former/modeling/meta_arch/mask_former_head.py",
             "vita/modeling/transformer_decoder/position_encoding.py",
             "vita/modeling/transformer_decoder/vita_mask2former_transformer_decoder.py",
             "vita/modeling/transformer_decoder/__init__.py",
             "vita/modeling/transformer_decoder/vita.py", "vita/vita_model.py"]
    modules, commit = {}, None
    for path in files:
        dotted = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        name = dotted.replace("vita.", "vita_official.", 1) if path.startswith("vita/") else dotted
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        module, commit = load_official(mirror, path, name, package)
        sys.modules[name] = modules[name.rpartition(".")[2]] = module
        if path.endswith("ms_deform_attn_func.py"):  # no compiled op: the official fallback
            stand_ins["MultiScaleDeformableAttention"].ms_deform_attn_forward = \
                lambda value, shapes, starts, locations, weights, step, \
                core=module.ms_deform_attn_core_pytorch: core(value, shapes, locations, weights)
    return modules, commit


def make_vita_full(mirror: str) -> None:
    """VITA's whole inference path: the official `Vita` (vita/vita_model.py) built from its
    modules (D2SwinTransformer, MaskFormerHead with MSDeformAttnPixelDecoder and
    VitaMultiScaleMaskedTransformerDecoder, the VITA module) at VITA_FULL_SIZES, seeded and
    perturbed weights, and its own `inference` (eval, fp32) on seeded uint8 frames. Saved as
    vita_full.pt: the state dict under the checkpoint's key names (the meta-architecture's own
    state_dict: backbone.*, sem_seg_head.pixel_decoder.*, sem_seg_head.predictor.*,
    vita_module.*; no criterion.empty_weight, the criteria being stand-ins), the frames and
    detectron2's pixel mean and std, and the tensors `inference` computes, caught with hooks: the
    frame decoder's outputs per frame, its frame queries and VITA's mask features (chunks
    concatenated), the VITA module's outputs, and the video masks, the official einsum
    "qc,tchw->qthw" on every video query (inference takes it on the top-scoring ones only,
    then resizes and thresholds)."""
    modules, commit = load_official_vita_model(mirror)
    from types import SimpleNamespace
    s, f = VITA_FULL_SIZES, VITA_FULL_FRAMES
    torch.manual_seed(0)
    swin_cfg = SimpleNamespace(
        PRETRAIN_IMG_SIZE=224, PATCH_SIZE=4, EMBED_DIM=s["embed_dim"], DEPTHS=list(s["depths"]),
        NUM_HEADS=list(s["swin_heads"]), WINDOW_SIZE=s["window"], MLP_RATIO=4.0, QKV_BIAS=True,
        QK_SCALE=None, DROP_RATE=0.0, ATTN_DROP_RATE=0.0, DROP_PATH_RATE=0.0, APE=False,
        PATCH_NORM=True, OUT_FEATURES=["res2", "res3", "res4", "res5"], USE_CHECKPOINT=False)
    backbone = modules["swin"].D2SwinTransformer(
        SimpleNamespace(MODEL=SimpleNamespace(SWIN=swin_cfg)), None)
    shapes = backbone.output_shape()
    pixel_decoder = modules["msdeformattn"].MSDeformAttnPixelDecoder(
        shapes, transformer_dropout=0.0, transformer_nheads=s["pixel_decoder_heads"],
        transformer_dim_feedforward=s["pixel_decoder_ffn"],
        transformer_enc_layers=s["pixel_decoder_layers"], conv_dim=s["conv_dim"],
        mask_dim=s["mask_dim"], norm="GN", transformer_in_features=["res3", "res4", "res5"],
        common_stride=4)
    predictor = modules["vita_mask2former_transformer_decoder"].\
        VitaMultiScaleMaskedTransformerDecoder(
            s["conv_dim"], True, num_classes=s["num_classes"], hidden_dim=s["hidden"],
            num_queries=s["frame_queries"], nheads=s["heads"], dim_feedforward=s["ffn"],
            dec_layers=s["dec_layers"], pre_norm=False, mask_dim=s["mask_dim"],
            enforce_input_project=False, vita_last_layer_num=3)
    head = modules["mask_former_head"].MaskFormerHead(
        shapes, num_classes=s["num_classes"], pixel_decoder=pixel_decoder,
        transformer_predictor=predictor, transformer_in_feature="multi_scale_pixel_decoder")
    vita_module = modules["vita"].VITA(
        s["hidden"], True, hidden_dim=s["hidden"], num_frame_queries=s["frame_queries"],
        num_queries=s["video_queries"], nheads=s["heads"], dim_feedforward=s["ffn"],
        enc_layers=s["enc_layers"], dec_layers=s["vita_dec_layers"],
        enc_window_size=s["enc_window"], pre_norm=False, enforce_input_project=True,
        num_frames=f["frames"], num_classes=s["num_classes"], clip_last_layer_num=3,
        conv_dim=s["conv_dim"], mask_dim=s["mask_dim"], sim_use_clip=True, use_sim=True)
    pixel_mean, pixel_std = [123.675, 116.280, 103.530], [58.395, 57.120, 57.375]  # the configs'
    model = modules["vita_model"].Vita(
        backbone=backbone, sem_seg_head=head, criterion=None, num_queries=s["video_queries"],
        object_mask_threshold=0.8, overlap_threshold=0.8, metadata=None, size_divisibility=32,
        pixel_mean=pixel_mean, pixel_std=pixel_std, test_topk_per_image=5,
        vita_module=vita_module, vita_criterion=None, num_frames=f["frames"],
        num_classes=s["num_classes"], is_multi_cls=True, apply_cls_thres=0.01,
        freeze_detector=False, test_run_chunk_size=f["chunk"], test_interpolate_chunk_size=5,
        is_coco=False)
    model.eval()
    perturb(model)
    frames = torch.randint(0, 256, (f["frames"], 3, f["height"], f["width"]), dtype=torch.uint8)
    caught = {"head": [], "mask_features": [], "vita": []}
    hooks = [model.sem_seg_head.register_forward_hook(
                 lambda m, args, out: caught["head"].append(out)),
             vita_module.vita_mask_features.register_forward_hook(
                 lambda m, args, out: caught["mask_features"].append(out)),
             vita_module.register_forward_hook(lambda m, args, out: caught["vita"].append(out))]
    with torch.no_grad():
        model.inference({"image": list(frames)})
    for hook in hooks:
        hook.remove()
    heads = [out for out, _, _ in caught["head"]]  # one per chunk: (T', ...)
    frame_outputs = {
        "pred_logits": torch.cat([h["pred_logits"] for h in heads]),  # (T, Q, K+1)
        "pred_masks": torch.cat([h["pred_masks"] for h in heads]),  # (T, Q, h, w)
        "aux_logits": [torch.cat(a) for a in zip(*[[x["pred_logits"] for x in h["aux_outputs"]]
                                                  for h in heads])],
        "aux_masks": [torch.cat(a) for a in zip(*[[x["pred_masks"] for x in h["aux_outputs"]]
                                                 for h in heads])],
        "frame_queries": torch.cat([q[-1] for _, q, _ in caught["head"]]),  # (T, Q, C)
    }
    mask_features = torch.cat(caught["mask_features"])  # (T, mask_dim, h, w)
    vita_out = caught["vita"][0]  # L = 1 frame-query layer, B = 1 clip at test
    video_masks = torch.einsum("qc,tchw->qthw", vita_out["pred_mask_embed"][-1, 0], mask_features)
    save("vita_full", repo="sukjunhwang/VITA", commit=commit,
         path="vita/vita_model.py (Vita.inference), mask2former/modeling/backbone/swin.py, "
              "mask2former/modeling/pixel_decoder/msdeformattn.py, "
              "mask2former/modeling/meta_arch/mask_former_head.py, "
              "vita/modeling/transformer_decoder/vita_mask2former_transformer_decoder.py, "
              "vita/modeling/transformer_decoder/vita.py",
         sizes=s, clip=f, state_dict={k: v.clone() for k, v in model.state_dict().items()},
         frames=frames, pixel_mean=torch.tensor(pixel_mean), pixel_std=torch.tensor(pixel_std),
         frame_outputs={k: [t.clone() for t in v] if isinstance(v, list) else v.clone()
                        for k, v in frame_outputs.items()},
         mask_features=mask_features.clone(),
         pred_logits=vita_out["pred_logits"][-1, 0].clone(),  # (V, K+1)
         pred_mask_embed=vita_out["pred_mask_embed"][-1, 0].clone(),  # (V, mask_dim)
         pred_fq_embed=vita_out["pred_fq_embed"][-1, 0].clone(),  # (T, Q, C)
         pred_cq_embed=vita_out["pred_cq_embed"][-1, 0].clone(),  # (V, C)
         pred_masks=video_masks.clone())  # (V, T, h, w)


def official_function(mirror: str, path: str, name: str, namespace: dict):
    """Only the top-level function or class `name` of an official file (the rest of the file, a
    training script's imports included, is not executed), defined in `namespace`."""
    text, commit = official_source(mirror, path)
    tree = ast.parse(text)
    node = next(n for n in tree.body
                if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), f"{Path(mirror).name}:{path}", "exec"),
         namespace)
    return namespace[name], commit


def perturb(module: nn.Module) -> None:
    """Every parameter away from its initialisation (biases, norms and zero-initialised gates
    too), reproducibly."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def make_lavt(mirror: str) -> None:
    """LAVT's language-aware Swin (lib/backbone.py: Swin blocks, PWAM, the gate, patch merging, the
    per-stage norms) on two images and padded words, and its decoder (lib/mask_predictor.py) on
    the encoder's outputs: eval mode (the decoder's BatchNorm running statistics perturbed too),
    and the decoder once more in training mode (batch statistics). Saved as lavt.pt."""
    backbone, commit = load_official(mirror, "lib/backbone.py", "lavt_lib.backbone", "lavt_lib")
    predictor, _ = load_official(mirror, "lib/mask_predictor.py", "lavt_lib.mask_predictor",
                                 "lavt_lib")
    sizes = dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4)
    torch.manual_seed(0)
    encoder = backbone.MultiModalSwinTransformer(**sizes, drop_path_rate=0.0)
    encoder.eval()  # (its train() override returns None)
    decoder = predictor.SimpleDecoding(8 * sizes["embed_dim"]).eval()
    perturb(encoder)
    perturb(decoder)
    with torch.no_grad():
        for m in decoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    images = torch.randn(2, 3, 72, 56)  # stage maps 18x14 .. 3x2: windows padded
    words = torch.randn(2, 768, 6)  # LAVT's layout: (B, C_w, L); the PWAMs take 768 wide words
    word_mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3])[..., None]  # (B, L, 1)
    state = {**{f"backbone.{k}": v.clone() for k, v in encoder.state_dict().items()},
             **{f"classifier.{k}": v.clone() for k, v in decoder.state_dict().items()}}
    with torch.no_grad():
        stages = encoder(images, words, word_mask)
        logits = decoder(*stages[::-1])
        decoder.train()  # (updates the running statistics: the state above is from before)
        train_logits = decoder(*stages[::-1])
    # train.py's criterion, LAVT's weighted cross-entropy: its `.cuda()` is a no-op here (CPU)
    criterion, _ = official_function(mirror, "train.py", "criterion", {"torch": torch, "nn": nn})
    cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda self, *args, **kwargs: self
    try:
        target = (torch.rand(2, *logits.shape[-2:]) > 0.6).long()  # (B, h, w) 0 / 1
        loss = criterion(logits, target)
    finally:
        torch.Tensor.cuda = cuda
    save("lavt", repo="yz93/LAVT-RIS", commit=commit,
         path="lib/backbone.py, lib/mask_predictor.py, train.py", sizes=sizes, state_dict=state,
         images=images, words=words, word_mask=word_mask, stages=list(stages), logits=logits,
         train_logits=train_logits, target=target, loss=loss)


def make_dshmp(mirror: str) -> None:
    """The sub-steps of DsHmp's hierarchical cross-attention whose structure is the paper's
    (dshmp/modeling/transformer_decoder/dshmp_decoder.py, HierarchicalCrossAttentionLayer): Eq.
    (3)'s matching of adjacent frames (`sort_embedding`) on clips whose frames permute the first
    frame's tokens, by swaps (a permutation that is its own inverse) and by a 3-cycle, and Eqs.
    (4)-(5)'s frame attention and weights (`get_attn`). Saved as dshmp.pt."""
    decoder, commit = load_official(mirror, "dshmp/modeling/transformer_decoder/dshmp_decoder.py",
                                    "dshmp_lib.dshmp_decoder", "dshmp_lib")
    torch.manual_seed(0)
    C, Q = 16, 4
    layer = decoder.HierarchicalCrossAttentionLayer(C, 1)
    base = torch.randn(Q, C)
    permutations = {"swaps": [[0, 1, 2, 3], [1, 0, 3, 2], [0, 1, 2, 3]],  # frame t = base[perm]
                    "cycle": [[0, 1, 2, 3], [1, 2, 0, 3], [2, 0, 1, 3]]}
    matching = {}
    for name, perms in permutations.items():
        frames = torch.stack([base[p] + 0.01 * torch.randn(Q, C) for p in perms])  # (T, Q, C)
        frame_query = frames[:, :, None]  # (T, fQ, L = 1, C), the official layout
        aligned, _ = layer.sort_embedding(frame_query.clone())
        matching[name] = {"frames": frames, "permutations": torch.tensor(perms),
                          "aligned": aligned[:, :, 0]}  # (T, Q, C) in the official order
    q, k, v = torch.randn(3, 8, C), torch.randn(3, 5, C), torch.randn(3, 5, C)  # (N, W, C), (N, M, C)
    out, weight = layer.get_attn(q, k, v)
    save("dshmp", repo="heshuting555/DsHmp", commit=commit,
         path="dshmp/modeling/transformer_decoder/dshmp_decoder.py", matching=matching,
         attention={"q": q, "k": k, "v": v, "out": out, "weight": weight[..., 0]})


def make_vatex(mirror: str) -> None:
    """VATEX's BAT (vatex/modeling/attention/visual_lang.py) as the CMD calls it (pixels as
    `tgt` without positions, words as `memory` with their positions, the float word mask), on
    words without padding and on words with padding (where the official float mask adds its value
    to the logits instead of blocking the pads: a documented deviation). Saved as vatex.pt."""
    layers, commit = load_official(mirror, "vatex/modeling/attention/attention_layer.py",
                                   "vatex_attention.attention_layer", "vatex_attention")
    sys.modules["vatex_attention.attention_layer"] = layers
    visual_lang, _ = load_official(mirror, "vatex/modeling/attention/visual_lang.py",
                                   "vatex_attention.visual_lang", "vatex_attention")
    torch.manual_seed(0)
    C, heads = 16, 8
    bat = visual_lang.BAT(C, nhead=heads)
    perturb(bat)
    visual = torch.randn(12, 2, C)  # (HW, N, C), the official layout
    words, word_pos = torch.randn(5, 2, C), torch.randn(5, 2, C)  # (L, N, C)
    cases = {}
    for name, pads in (("no_padding", [0, 0]), ("padding", [0, 2])):
        mask = torch.zeros(2, 5)  # (N, L) float, 1.0 on a pad, as the official caption holds it
        for n, k in enumerate(pads):
            if k:
                mask[n, -k:] = 1.0
        with torch.no_grad():
            pixels, updated = bat(tgt=visual, memory=words, memory_key_padding_mask=mask,
                                  pos=word_pos, query_pos=None)
        cases[name] = {"word_mask": mask, "pixels": pixels, "words": updated}
    save("vatex", repo="nero1342/VATEX", commit=commit,
         path="vatex/modeling/attention/visual_lang.py", sizes={"dim": C, "heads": heads},
         state_dict=bat.state_dict(), visual=visual, words=words, word_pos=word_pos, cases=cases)


# VATEX's CMD at a small size: C = 32 (its GroupNorms have 32 groups), the BATs' 8 heads (cmd.py
# fixes them) and 8 in the deformable encoder, 2 encoder layers, FFN 64; the backbone's maps
# res2 .. res5 as name: (channels, stride, h, w), sizes that no level divides evenly.
VATEX_CMD_SIZES = dict(conv_dim=32, mask_dim=32, transformer_nheads=8,
                       transformer_dim_feedforward=64, transformer_enc_layers=2,
                       transformer_dropout=0.0)
VATEX_CMD_STAGES = {"res2": (8, 4, 18, 14), "res3": (12, 8, 9, 7), "res4": (16, 16, 5, 4),
                    "res5": (24, 32, 3, 2)}


def load_official_vatex_cmd(mirror: str):
    """The official CMD class (vatex/modeling/pixel_decoder/cmd.py) and the files it imports from
    the mirror, executed as the package `vatex_official` (vatex/); returns (class, commit).
    Stand-ins: the detectron2 names cmd.py and msdeformattn.py import (ShapeSpec, get_norm "GN" =
    GroupNorm(32), the head registry), utils.misc (NestedTensor, unused here) and the compiled
    MultiScaleDeformableAttention, whose op is replaced by the official pure-PyTorch fallback
    (ops/functions/ms_deform_attn_func.py, ms_deform_attn_core_pytorch, what ms_deform_attn.py
    itself runs when the op fails)."""
    from collections import namedtuple
    layers = sys.modules["detectron2.layers"]
    layers.ShapeSpec = namedtuple("ShapeSpec", "channels height width stride",
                                  defaults=(None,) * 4)
    layers.get_norm = lambda norm, channels: {"GN": lambda: nn.GroupNorm(32, channels)}[norm]()
    registry = types.SimpleNamespace(register=lambda: (lambda cls: cls))
    stand_ins = {name: types.ModuleType(name) for name in (
        "detectron2.modeling", "MultiScaleDeformableAttention", "vatex_official.utils.misc")}
    stand_ins["detectron2.modeling"].SEM_SEG_HEADS_REGISTRY = registry
    stand_ins["vatex_official.utils.misc"].NestedTensor = type("NestedTensor", (), {})
    sys.modules.update(stand_ins)
    module, commit = load_official_vatex(mirror, (
        "attention/attention_layer.py", "attention/visual_lang.py", "attention/__init__.py",
        "transformer_decoder/position_encoding.py",
        "pixel_decoder/ops/functions/ms_deform_attn_func.py",
        "pixel_decoder/ops/functions/__init__.py", "pixel_decoder/ops/modules/ms_deform_attn.py",
        "pixel_decoder/ops/modules/__init__.py", "pixel_decoder/msdeformattn.py",
        "pixel_decoder/cmd.py"))
    return module.ContextualMultimodalDecoder, commit


def load_official_vatex(mirror: str, paths):
    """Execute official files of vatex/modeling/ (`paths` relative to it, in order) as modules of
    the package `vatex_official.modeling`, for their relative imports; returns (the last module,
    commit). ms_deform_attn.py's compiled op is replaced by the official pure-PyTorch fallback."""
    module = commit = None
    for path in paths:
        module_path = path.removesuffix(".py").removesuffix("/__init__")
        name = "vatex_official.modeling." + module_path.replace("/", ".")
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        module, commit = load_official(mirror, "vatex/modeling/" + path, name, package)
        sys.modules[name] = module
        if path.endswith("ms_deform_attn.py"):  # no compiled op: the official fallback instead
            core = module.ms_deform_attn_core_pytorch
            module.MSDeformAttnFunction = types.SimpleNamespace(
                apply=lambda value, shapes, starts, locations, weights, step:
                core(value, shapes, locations, weights))
    return module, commit


def make_vatex_cmd(mirror: str) -> None:
    """VATEX's CMD (vatex/modeling/pixel_decoder/cmd.py, forward_features: the early BATs, the
    deformable encoder, the four levels' BATs and FPN convs, the mask features) in eval mode on
    seeded backbone maps and words without padding (float mask all 0). Saved as vatex_cmd.pt: the
    four levels (level 1 the BAT's output, which cmd.py returns without a conv; level 4 the input
    of its mask_features conv), the mask features and the words F_4^w."""
    cmd_class, commit = load_official_vatex_cmd(mirror)
    ShapeSpec = sys.modules["detectron2.layers"].ShapeSpec
    torch.manual_seed(0)
    shapes = {name: ShapeSpec(channels=c, stride=s) for name, (c, s, _, _) in
              VATEX_CMD_STAGES.items()}
    cmd = cmd_class(shapes, **VATEX_CMD_SIZES, norm="GN",
                    transformer_in_features=["res3", "res4", "res5"], common_stride=4).eval()
    perturb(cmd)
    B, L, C = 2, 5, VATEX_CMD_SIZES["conv_dim"]
    features = {name: torch.randn(B, c, h, w) for name, (c, _, h, w) in VATEX_CMD_STAGES.items()}
    words, word_pos = torch.randn(L, B, C), torch.randn(L, B, C)  # (L, N, C), the official layout
    word_mask = torch.zeros(B, L)  # (N, L) float, 1.0 on a pad: no pads
    level4 = []  # the input of mask_features, cmd.py's last FPN level
    hook = cmd.mask_features.register_forward_hook(lambda m, args, out: level4.append(args[0]))
    with torch.no_grad():
        mask_features, _, levels, caption, _ = cmd.forward_features(
            dict(features), (words, word_mask, word_pos, None))
    hook.remove()
    save("vatex_cmd", repo="nero1342/VATEX", commit=commit,
         path="vatex/modeling/pixel_decoder/cmd.py", sizes=VATEX_CMD_SIZES,
         stages={name: list(shape) for name, shape in VATEX_CMD_STAGES.items()},
         state_dict={k: v.clone() for k, v in cmd.state_dict().items()}, features=features,
         words=words, word_pos=word_pos, word_mask=word_mask,
         levels=[t.clone() for t in (*levels, level4[0])], mask_features=mask_features.clone(),
         out_words=caption[0].clone())


# VATEX's masked-attention decoder at a small size: C = 32, 4 heads, FFN 32, 3 queries, 3 layers
# (one per level: the first unmasked, the next two masked), 1 + 1 classes; 2 captions of 6 words,
# levels 1-3 and the mask features at sizes that do not divide each other.
VATEX_DECODER_SIZES = dict(hidden_dim=32, num_queries=3, nheads=4, dim_feedforward=32,
                           dec_layers=3, mask_dim=32, num_classes=1)
VATEX_DECODER_MAPS = [(2, 3), (3, 5), (5, 8)]  # levels 1-3, coarse first: (h, w)
VATEX_DECODER_MASK_SIZE = (6, 9)


def load_official_vatex_decoder(mirror: str):
    """The official VATEXTransformerDecoder (vatex/modeling/transformer_decoder/
    vatext_trans_decoder.py, the TRANSFORMER_DECODER_NAME of configs/refcoco/BASE_VATEX.yaml) and
    the files it imports, executed as in load_official_vatex_cmd; returns (class, commit).
    Stand-ins: detectron2's Registry, utils.misc (NestedTensor, unused here) and matplotlib.pyplot,
    whose `text` the file imports and never uses."""
    registry = types.ModuleType("detectron2.utils.registry")
    registry.Registry = lambda name: types.SimpleNamespace(register=lambda: (lambda cls: cls))
    misc = types.ModuleType("vatex_official.utils.misc")
    misc.NestedTensor = type("NestedTensor", (), {})
    for module in (registry, misc, types.ModuleType("detectron2.utils"),
                   types.ModuleType("matplotlib"), types.ModuleType("matplotlib.pyplot")):
        sys.modules.setdefault(module.__name__, module)
    sys.modules["matplotlib.pyplot"].text = getattr(sys.modules["matplotlib.pyplot"], "text", None)
    module, commit = load_official_vatex(mirror, (
        "attention/attention_layer.py", "attention/visual_lang.py", "attention/__init__.py",
        "transformer_decoder/position_encoding.py", "transformer_decoder/vatext_trans_decoder.py"))
    return module.VATEXTransformerDecoder, commit


def make_vatex_decoder(mirror: str) -> None:
    """VATEX's decoder (VATEXTransformerDecoder.forward: the queries = the sentence feature, the
    CLIP prior `list_vis` added after the first prediction, each layer's visual and word
    cross-attention, self-attention and FFN, the class and mask heads and the next layer's
    attention mask) in training mode with one frame per clip (at test it takes the whole batch as
    one clip's frames; dropout is 0, so the modes differ only there), on seeded levels and mask
    features, 2 captions with 0 and 2 padded words (the bool mask the official caption
    carries), with the prior and without it (list_vis None). Its own positions: the 3-D sine of
    position_encoding.py on one frame. Saved as vatex_decoder.pt."""
    decoder_class, commit = load_official_vatex_decoder(mirror)
    s = VATEX_DECODER_SIZES
    torch.manual_seed(0)
    decoder = decoder_class(s["hidden_dim"], True, **s, pre_norm=False,
                            enforce_input_project=False, num_frames=1).train()
    perturb(decoder)
    N, L, C = 2, 6, s["hidden_dim"]
    maps = [torch.randn(N, C, h, w) for h, w in VATEX_DECODER_MAPS]
    mask_features = torch.randn(N, C, *VATEX_DECODER_MASK_SIZE)
    words, word_pos = torch.randn(L, N, C), torch.randn(L, N, C)  # (L, N, C), the official layout
    word_mask = torch.zeros(N, L, dtype=torch.bool)  # (N, L) True on a pad, as the official
    word_mask[1, -2:] = True
    sentence, list_vis = torch.randn(N, C), torch.randn(1, N, C)  # F_s; the prior (1, N, C)
    cases = {}
    for name, prior in (("prior", list_vis), ("no_prior", None)):
        with torch.no_grad():
            out = decoder([m.clone() for m in maps], mask_features.clone(),
                          (words, word_mask, word_pos, sentence), prior)
        predictions = [*out["aux_outputs"], out]
        cases[name] = {"pred_logits": [p["pred_logits"].clone() for p in predictions],  # (N, Q, 2)
                       "pred_masks": [p["pred_masks"][:, :, 0].clone() for p in predictions]}
        blocked = [(m.sigmoid() < 0.5).float().mean().item() for m in cases[name]["pred_masks"]]
        print(f"vatex_decoder {name}: blocked share of each prediction's mask {blocked}")
    save("vatex_decoder", repo="nero1342/VATEX", commit=commit,
         path="vatex/modeling/transformer_decoder/vatext_trans_decoder.py", sizes=s,
         state_dict={k: v.clone() for k, v in decoder.state_dict().items()}, maps=maps,
         mask_features=mask_features, words=words, word_pos=word_pos, word_mask=word_mask,
         sentence=sentence, list_vis=list_vis, cases=cases)


def make_vatex_mcc(mirror: str, info_nce_mirror: str) -> None:
    """The official MCC loss (vatex/modeling/criterion.py, VideoSetCriterion.loss_contrastive:
    InfoNCE(negative_mode='unpaired') of the `info-nce-pytorch` package, info_nce/__init__.py,
    defaults temperature 0.1 and mean reduction, summed both ways) on one process (world size 1:
    no all-gather), and its gradient, on the sentence features of 4 triplets in the official
    caption order (expression, negative, positive). Saved as vatex_mcc.pt."""
    info_nce, info_commit = load_official(info_nce_mirror, "info_nce/__init__.py", "info_nce")
    one_process = types.SimpleNamespace(get_world_size=lambda: 1)
    import torch.nn.functional as F
    criterion, commit = official_function(mirror, "vatex/modeling/criterion.py",
                                          "VideoSetCriterion",
                                          {"torch": torch, "nn": nn, "F": F, "dist": one_process,
                                           "InfoNCE": info_nce.InfoNCE})
    torch.manual_seed(0)
    sentence = torch.randn(12, 32).requires_grad_()  # (3T, C): 4 triplets
    loss = criterion.loss_contrastive(None, {"sentence_feats": sentence})["loss_contrastive"]
    loss.backward()
    save("vatex_mcc", repo="nero1342/VATEX", commit=commit,
         path="vatex/modeling/criterion.py (loss_contrastive); info_nce/__init__.py of "
              f"RElbers/info-nce-pytorch @ {info_commit}",
         info_nce_commit=info_commit, temperature=info_nce.InfoNCE().temperature,
         sentence=sentence.detach().clone(), loss=loss.detach().clone(),
         grad=sentence.grad.clone())


def save(name: str, **fixture) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, OUT / f"{name}.pt")
    print(f"wrote {OUT / name}.pt", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vita", help="a git mirror of github.com/sukjunhwang/VITA")
    parser.add_argument("--lavt", help="a git mirror of github.com/yz93/LAVT-RIS")
    parser.add_argument("--dshmp", help="a git mirror of github.com/heshuting555/DsHmp")
    parser.add_argument("--vatex", help="a git mirror of github.com/nero1342/VATEX")
    parser.add_argument("--info-nce", help="with --vatex: a git mirror of "
                        "github.com/RElbers/info-nce-pytorch (the official MCC loss)")
    args = parser.parse_args(argv)
    if not (args.vita or args.lavt or args.dshmp or args.vatex):
        parser.error("name at least one mirror (--vita, --lavt, --dshmp, --vatex)")
    if args.vatex and not args.info_nce:
        parser.error("--vatex needs --info-nce too (VATEX's MCC loss is that package's InfoNCE)")
    install_stand_ins()
    if args.vita:
        make_vita(args.vita)
        make_vita_full(args.vita)
    if args.lavt:
        make_lavt(args.lavt)
    if args.dshmp:
        make_dshmp(args.dshmp)
    if args.vatex:
        make_vatex(args.vatex)
        make_vatex_cmd(args.vatex)
        make_vatex_decoder(args.vatex)
        make_vatex_mcc(args.vatex, args.info_nce)


if __name__ == "__main__":
    main()
