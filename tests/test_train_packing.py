import pytest
import torch

from conftest import make_model, noise_image
from train_fixtures import tiny_config, tiny_data  # noqa: F401
from vistune.data.collate import PadCollator
from vistune.data.images import preprocess
from vistune.text.encode import encode_conversation
from vistune.train.batches import TrainCollator
from vistune.train.packing import PACKED_ATTENTION, PackCollator, pack_rows, use_packed_attention
from tolerances import TINY_BACKWARD, TINY_FORWARD, TINY_TERMS, assert_grads_reordered, assert_reordered, trained_losses


def samples(model, tok, n=6):
    out = []
    for k in range(n):
        img = k % 3 != 2
        q = ("<image>\n" if img else "") + "what color is the " + "small " * (k * 3) + "circle?"
        enc = encode_conversation(tok, "vicuna_v1", [{"from": "human", "value": q},
                                                    {"from": "gpt", "value": "it is red " + "and blue " * k}],
                                  image_token_id=model.image_token_id, num_image_tokens=model.config.num_image_tokens)
        pix = preprocess(noise_image(k), model.config.image).unsqueeze(0) if img else None
        out.append({"id": f"s{k}", "input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels),
                    "pixel_values": pix})
    return out


def test_pack_rows_fills_few_rows_evenly():
    lengths = [5, 3, 8, 2, 7]
    rows = pack_rows(lengths, capacity=10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3
    # wide capacity: 2 rows of about half the tokens each, not one full row and a stub
    lengths = [218, 195, 119, 204, 114, 223, 115, 113]
    fills = sorted(sum(lengths[i] for i in r) for r in pack_rows(lengths, capacity=1024))
    assert len(fills) == 2 and fills[1] - fills[0] < 120
    assert pack_rows([12, 3], capacity=10) == [[0], [1]]  # a sample over capacity gets a row of its own
    assert pack_rows([12, 3, 2], capacity=10) == [[0], [1, 2]]


@pytest.mark.parametrize("text,attention", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", PACKED_ATTENTION),
                                            ("qwen2", PACKED_ATTENTION)])
def test_packed_loss_and_grads_equal_unpacked(tokenizer, text, attention):
    model, tok = make_model(tokenizer, text=text)
    model.train()
    if attention == PACKED_ATTENTION:
        assert use_packed_attention(model.language_model) == "sdpa"
        assert model.language_model.config._attn_implementation == PACKED_ATTENTION
    ss = samples(model, tok)
    padded = PadCollator(tok.pad_token_id)(ss)
    longest = max(len(s["input_ids"]) for s in ss)
    packed = PackCollator(tok.pad_token_id, capacity=2 * longest)(ss)
    assert packed["input_ids"].shape[0] < len(ss)  # really packed
    assert packed["attention_mask"] is None
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    def loss_and_grads(batch):
        model.zero_grad()
        kw = {k: batch.get(k) for k in ("attention_mask", "position_ids", "pixel_values")}
        out = model(batch["input_ids"], labels=batch["labels"], **kw)
        out.loss.backward()
        return out.loss.detach(), out.num_supervised, {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None}

    la, na, ga = loss_and_grads(padded)
    lb, nb, gb = loss_and_grads(packed)
    assert na == nb
    # Packed rows sum the same terms as padded ones, blocked differently: forward and backward bounds.
    assert_reordered(lb, la, TINY_TERMS, TINY_FORWARD)
    assert ga.keys() == gb.keys()
    assert_grads_reordered([gb[n] for n in ga], [ga[n] for n in ga], TINY_TERMS, TINY_BACKWARD)

    # Block-diagonal for real: changing one sample changes no other sample's logits.
    with torch.no_grad():
        def logits(batch):
            return model(batch["input_ids"], attention_mask=None, position_ids=batch["position_ids"],
                         pixel_values=batch["pixel_values"]).logits
        base = logits(packed)
        ss2 = [dict(s) for s in ss]
        ss2[0] = {**ss2[0], "input_ids": ss2[0]["input_ids"].clone()}
        ss2[0]["input_ids"][-3:] = 7
        changed = logits(PackCollator(tok.pad_token_id, capacity=2 * longest)(ss2))
    moved = (base - changed).abs().amax(-1) > 1e-6  # (rows, positions)
    seg = packed["segments"][packed["ids"].index("s0")]
    r, start, n = seg
    assert moved[r, start:start + n].any()
    moved[r, start:start + n] = False
    assert not moved.any()  # no other sample (nor the padding) saw the change


def test_train_collator_drops_bad_samples_and_packs(tokenizer):
    model, tok = make_model(tokenizer)
    ss = samples(model, tok, 3)
    bad = {"bad": True, "id": "x", "reason": "image not found", "index": 9}
    b = TrainCollator(tok.pad_token_id)([ss[0], bad, ss[1]])
    assert b["num_samples"] == 2 and b["ids"] == ["s0", "s1"] and b["bad"][0]["id"] == "x"
    assert b["num_tokens"] == len(ss[0]["input_ids"]) + len(ss[1]["input_ids"])
    p = TrainCollator(tok.pad_token_id, packing=True, pack_length=4096)([ss[0], bad, ss[1], ss[2]])
    assert p["input_ids"].shape[0] == 1 and p["num_samples"] == 3
    assert TrainCollator(tok.pad_token_id)([bad])["num_samples"] == 0


def test_training_with_packing_follows_the_unpacked_run(tmp_path, tiny_data):
    import json

    from vistune.train import run

    def losses(packing):
        cfg = tiny_config(tiny_data, tmp_path / f"p{packing}", {"data.packing": packing, "data.pack_length": 512,
                                                               "data.group_by_length": True, "train.max_steps": 3,
                                                               "train.batch_size": 6})
        r = run(cfg)
        return [json.loads(x)["loss"] for x in r.metrics_path.read_text().splitlines()], r

    a, _ = losses(False)
    b, r = losses(True)
    assert b == pytest.approx(a, **trained_losses(3))  # packed and padded steps: other blocking
    # the saved model is back on standard attention
    saved = json.loads((r.model_dir / "config.json").read_text())["text"]
    assert saved.get("_attn_implementation", "sdpa") in ("sdpa", None)
