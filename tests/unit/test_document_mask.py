"""data.document_mask: a packed window with the mask computes every document
as if it were alone. The reference is the per-document forward: each
document's tokens through the same model on their own (outputs and
gradients). RoPE and ALiBi depend only on relative positions, so the
document's offset in the window does not matter; fp32, tolerance 1e-5."""
import pytest
import torch

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.document_mask import document_bias, document_ids
from moe_train.model.transformer import build_model

EOD = 0


def test_document_ids_and_bias_by_hand():
    ids = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9]])
    assert document_ids(ids, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    bias = document_bias(document_ids(ids, EOD))[0, 0]
    docs = [0, 0, 0, 1, 1, 2, 3, 3]
    for q in range(8):
        for k in range(8):
            allowed = k <= q and docs[k] == docs[q]
            assert (bias[q, k] == 0) == allowed and (bias[q, k] == float("-inf")) != allowed


@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_masked_window_equals_each_document_alone(pe):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_seq_len=32, position_embedding=pe, init_std=0.2),
        # Token choice, dropless: a token's route does not depend on the others.
        MoEConfig(num_experts=4, top_k=2, capacity_factor=None)).eval()
    # Two windows, documents of different lengths, EOD (id 0) closing each one.
    lengths = [[5, 7, 4], [3, 9, 2, 2]]
    rows = []
    for row in lengths:
        toks = []
        for n in row:
            toks += torch.randint(1, 40, (n - 1,)).tolist() + [EOD]
        rows.append(toks)
    ids = torch.tensor(rows)

    weights = torch.randn(2, 16, 40)  # a random linear loss, to compare gradients too
    out = model(ids, document_ids=document_ids(ids, EOD)).logits
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref_loss = 0
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = model(ids[b:b + 1, start:start + n]).logits
            torch.testing.assert_close(out[b:b + 1, start:start + n], alone, atol=1e-5, rtol=1e-5)
            ref_loss = ref_loss + (alone * weights[b:b + 1, start:start + n]).sum()
            start += n
    ref_loss.backward()
    for name, p in model.named_parameters():
        if name in grads:
            # The two sums run in different orders: fp32 rounding (eps 1.2e-7)
            # over a few hundred terms, relative to the gradient's scale.
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5 * scale, rtol=1e-5,
                                       msg=name)

    # Without the mask, later documents see earlier ones: the test can fail.
    plain = model(ids).logits
    assert not torch.allclose(plain[0, 5:12], out[0, 5:12], atol=1e-3)
