"""Parity fixtures: small modules of the official code, run on seeded inputs, saved as numbers
(tests/fixtures/parity/<name>.pt) for tests/test_parity.py to compare our modules with.

Run by hand, not by CI (it needs a local git mirror of the official repository; the test suite
needs only the saved numbers). The official source is read from the mirror with `git show` and
executed in memory; nothing of it is copied into this repository.

    git clone --mirror https://github.com/sukjunhwang/VITA MIRRORS/VITA.git
    git clone --mirror https://github.com/yz93/LAVT-RIS MIRRORS/LAVT-RIS.git
    git clone --mirror https://github.com/heshuting555/DsHmp MIRRORS/DsHmp.git
    git clone --mirror https://github.com/nero1342/VATEX MIRRORS/VATEX.git
    python tests/parity/make_fixtures.py --vita MIRRORS/VITA.git --lavt MIRRORS/LAVT-RIS.git \\
        --dshmp MIRRORS/DsHmp.git --vatex MIRRORS/VATEX.git

MIRRORS is a folder of your choice outside the repository. Each fixture holds: the repository,
commit and file, the module's sizes and its state dict under the official key names (seeded
random weights) where it has weights, and the inputs and the outputs (fp32, CPU).

Written so far: vita_module.pt, the VITA module (vita/modeling/transformer_decoder/vita.py: the
Object Encoder in training and at test with plain and shifted windows, the Object Decoder, the
class, mask-embedding and similarity heads); lavt.pt, LAVT's language-aware Swin with PWAM and the
gates (lib/backbone.py), its decoder (lib/mask_predictor.py) and its weighted cross-entropy
(train.py's criterion); dshmp.pt, DsHmp's matching of adjacent frames (Eq. 3) and its frame
attention and weights (Eqs. 4-5); vatex.pt, VATEX's BAT (Eqs. 2-3) as the CMD calls it. The
detectron2, fvcore, timm and mmseg names the official files import are stand-ins
(install_stand_ins).
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


def official_function(mirror: str, path: str, name: str, namespace: dict):
    """Only the top-level function `name` of an official file (the rest of the file, a training
    script's imports included, is not executed), defined in `namespace`."""
    text, commit = official_source(mirror, path)
    tree = ast.parse(text)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
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
    args = parser.parse_args(argv)
    if not (args.vita or args.lavt or args.dshmp or args.vatex):
        parser.error("name at least one mirror (--vita, --lavt, --dshmp, --vatex)")
    install_stand_ins()
    if args.vita:
        make_vita(args.vita)
    if args.lavt:
        make_lavt(args.lavt)
    if args.dshmp:
        make_dshmp(args.dshmp)
    if args.vatex:
        make_vatex(args.vatex)


if __name__ == "__main__":
    main()
