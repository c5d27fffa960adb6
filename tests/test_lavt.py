"""common/lavt.py: LAVT's pixel-word attention (PWAM) against a hand computation."""
import torch

from common.lavt import PixelWordAttention


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
