"""common/lavt.py: LAVT's pixel-word attention (PWAM) against a hand computation."""
import torch

from common.lavt import LanguageAwareSwin, LanguageGate, PixelWordAttention


def test_pixel_word_attention_reads_only_the_real_words():
    torch.manual_seed(0)
    pwam = PixelWordAttention(dim=8, word_dim=6).eval()
    x, words = torch.randn(2, 8, 3, 5), torch.randn(2, 4, 6)
    word_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = pwam(x, words, word_mask)
    assert out.shape == x.shape
    changed = words.clone()
    changed[0, 2:] = torch.randn(2, 6)  # padding words of sample 0
    assert torch.allclose(pwam(x, changed, word_mask), out)
    changed[0, 0] = torch.randn(6)  # a real word
    assert not torch.allclose(pwam(x, changed, word_mask)[0], out[0])
    # by hand: per-pixel softmax over the real words, then vis(x) * out(lang) through mm
    q = pwam.query(x)[0].flatten(1).T  # (15, 8)
    attn = torch.softmax(q @ pwam.key(words[0, :2]).T / 8**0.5, -1)  # (15, 2)
    lang = pwam.out((attn @ pwam.value(words[0, :2])).T.reshape(1, 8, 3, 5))
    assert torch.allclose(out[:1], pwam.mm(pwam.vis(x[:1]) * lang), atol=1e-5)


# ------------------------------------------------------------------ the language-aware Swin (LAVT)
def _tiny_swin():
    from common.backbones import SWIN_STAGES, swin_backbone
    from transformers import SwinConfig
    return swin_backbone(SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4,
                                    out_features=SWIN_STAGES)).eval()


def test_language_gate_is_lavt_initialised_and_bounded():
    torch.manual_seed(0)
    gate = LanguageGate(256)
    for layer in (gate.mlp[0], gate.mlp[2]):
        assert layer.bias is None and abs(layer.weight.std().item() - 0.02) < 0.002
    x = torch.randn(2, 256, 3, 4) * 100
    out = gate(x)
    assert out.shape == x.shape and out.abs().max() <= 1
    # by hand at one pixel: tanh(W2 relu(W1 f))
    f = x[1, :, 2, 3]
    expected = torch.tanh(gate.mlp[2].weight @ torch.relu(gate.mlp[0].weight @ f))
    torch.testing.assert_close(out[1, :, 2, 3], expected)


def test_language_aware_swin_equals_the_backbone_when_the_words_are_inert():
    """With PWAM outputs replaced by the stage features themselves and closed gates, the stage
    outputs are SwinBackbone's own feature maps: the stages run, merge and norm exactly as there."""
    torch.manual_seed(0)
    backbone = _tiny_swin()
    encoder = LanguageAwareSwin(channels=backbone.channels, word_dim=6).eval()
    x, words, mask = torch.randn(2, 3, 64, 96), torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool)
    for pwam in encoder.pwams:
        pwam.forward = lambda v, w, m: v  # F_i = V_i
    for gate in encoder.gates:
        gate.forward = lambda f: torch.zeros_like(f)  # S_i = 0: nothing flows back
    with torch.no_grad():
        ours = encoder(backbone, x, words, mask)
        theirs = backbone(x).feature_maps
    assert len(ours) == 4
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_language_aware_swin_feeds_the_gated_words_into_the_next_stage():
    torch.manual_seed(0)
    backbone = _tiny_swin()
    encoder = LanguageAwareSwin(channels=backbone.channels, word_dim=6).eval()
    assert len(encoder.gates) == 3  # the last stage feeds nothing
    x, words = torch.randn(1, 3, 64, 96), torch.randn(1, 4, 6)
    mask = torch.tensor([[True, True, True, False]])
    with torch.no_grad():
        out = encoder(backbone, x, words, mask)
        changed = words.clone()
        changed[0, 3] = 50.0  # a padded word: nothing changes
        assert all(torch.equal(a, b) for a, b in zip(out, encoder(backbone, x, changed, mask)))
        # stage 2 sees stage 1's words only through the gate: closing gate 1 changes stage 2's output
        gate = encoder.gates[0].forward
        encoder.gates[0].forward = lambda f: torch.zeros_like(f)
        closed = encoder(backbone, x, words, mask)
        encoder.gates[0].forward = gate
    torch.testing.assert_close(closed[0], out[0])
    assert not torch.allclose(closed[1], out[1])
    # gradients reach every PWAM and gate
    encoder.train()
    sum(o.sum() for o in encoder(backbone, x, words, mask)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_a_zero_initialised_gate_never_opens():
    """DsHmp's official code zero-initialises both Linear layers of its gate (swin.py, MMBasicLayer):
    then its output and the gradients of both weights are exactly zero, so no optimiser step moves
    it and nothing is ever fed back. `feedback=False` is that encoder."""
    torch.manual_seed(0)
    gate = LanguageGate(8)
    for layer in (gate.mlp[0], gate.mlp[2]):
        torch.nn.init.zeros_(layer.weight)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(3):
        f = torch.randn(2, 8, 3, 5)
        out = gate(f)
        optimizer.zero_grad()
        (out * f).sum().backward()
        assert not out.any() and all(not p.grad.any() for p in gate.parameters())
        optimizer.step()
    assert all(not p.any() for p in gate.parameters())


def test_without_feedback_the_swin_stages_never_see_the_words():
    """feedback=False: no gates; each stage's output is LayerNorm(PWAM(V_i)) with V_i SwinBackbone's
    own stage features, whatever the words (checked by replacing PWAM with the identity)."""
    torch.manual_seed(0)
    backbone = _tiny_swin()
    encoder = LanguageAwareSwin(channels=backbone.channels, word_dim=6, feedback=False).eval()
    assert encoder.gates is None
    x, mask = torch.randn(2, 3, 64, 96), torch.ones(2, 4, dtype=torch.bool)
    inputs = []  # what enters the last stage's first block
    hook = backbone.swin.encoder.layers[3].blocks[0].register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].clone()))
    with torch.no_grad():
        first = encoder(backbone, x, torch.randn(2, 4, 6), mask)
        second = encoder(backbone, x, torch.randn(2, 4, 6), mask)
    hook.remove()
    torch.testing.assert_close(inputs[0], inputs[1])  # the words changed, the Swin stages did not
    assert not torch.allclose(first[3], second[3])  # the outputs, read through PWAM, did
    for pwam in encoder.pwams:
        pwam.forward = lambda v, w, m: v
    with torch.no_grad():
        ours, theirs = encoder(backbone, x, torch.randn(2, 4, 6), mask), backbone(x).feature_maps
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
