import pytest
import torch

from conftest import make_model, noise_image
from vistune.data.collate import PadCollator
from vistune.data.images import preprocess
from vistune.model.projector import build_projector
from vistune.model.vlm import IGNORE_INDEX, ImageTokenMismatch
from vistune.text.encode import encode_conversation
from tolerances import TINY_FORWARD, TINY_TERMS, assert_reordered


def sample(model, tok, text, n_images, seed=0, reply="The circle is red."):
    enc = encode_conversation(
        tok, "vicuna_v1", [{"from": "human", "value": text}, {"from": "gpt", "value": reply}],
        image_token_id=model.image_token_id, num_image_tokens=model.config.num_image_tokens,
    )
    pix = torch.stack([preprocess(noise_image(seed + k), model.config.image) for k in range(n_images)]) if n_images else None
    return {"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels), "pixel_values": pix}


def test_projector_kinds():
    assert isinstance(build_projector("linear", 8, 16), torch.nn.Linear)
    mlp = build_projector("mlp3x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert mlp(torch.zeros(2, 8)).shape == (2, 16)
    with pytest.raises(ValueError, match="unknown projector type 'mlp2x_relu'"):
        build_projector("mlp2x_relu", 8, 16)


@pytest.mark.parametrize("vision,text", [("clip", "llama"), ("siglip", "qwen2"), ("clip", "gpt2")])
def test_features_land_exactly_at_image_positions(tokenizer, vision, text):
    model, tok = make_model(tokenizer, vision, text)
    samples = [
        sample(model, tok, "<image>\nWhat color?", 1, seed=1),
        sample(model, tok, "What color is it?", 0),
        sample(model, tok, "<image>\nfirst <image>\nsecond", 2, seed=5),
    ]
    batch = PadCollator(tok.pad_token_id, side="right")(samples)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        feats = model.project(model.vision(batch["pixel_values"]))  # (3 images, T, D)
        text_emb = model.language_model.get_input_embeddings()
    T = model.config.num_image_tokens
    assert feats.shape[:2] == (3, T)
    # Reference by hand: walk each row, image features in order, token embeddings elsewhere.
    img = 0
    for b in range(3):
        ids = batch["input_ids"][b]
        pos = (ids == model.image_token_id).nonzero().flatten().tolist()
        for k in range(0, len(pos), T):
            block = pos[k:k + T]
            assert block == list(range(block[0], block[0] + T))
            torch.testing.assert_close(embeds[b, block], feats[img], rtol=0, atol=0)
            img += 1
        other = [i for i in range(len(ids)) if i not in pos]
        torch.testing.assert_close(embeds[b, other], text_emb(ids[other]), rtol=0, atol=0)
    assert img == 3
    # Pixels vs cached vision features vs projected embeddings: same splice.
    with torch.no_grad():
        vf = model.vision(batch["pixel_values"])
        torch.testing.assert_close(model.embed(batch["input_ids"], vision_features=vf), embeds)
        torch.testing.assert_close(model.embed(batch["input_ids"], image_embeds=feats), embeds)


def test_mismatched_images_and_placeholders_raise(tiny_model):
    model, tok = tiny_model
    s = sample(model, tok, "<image>\nWhat color?", 1)
    batch = PadCollator(tok.pad_token_id)([s])
    two = torch.cat([batch["pixel_values"], batch["pixel_values"]])
    with pytest.raises(ImageTokenMismatch, match="16 image-token positions but 32"):
        model(batch["input_ids"], batch["attention_mask"], two)
    with pytest.raises(ImageTokenMismatch, match="but 0 image feature"):
        model(batch["input_ids"], batch["attention_mask"], None)


def test_left_and_right_padding_give_same_logits(tiny_model):
    model, tok = tiny_model
    samples = [sample(model, tok, "<image>\nWhat color is the big circle on the left?", 1, seed=3),
               sample(model, tok, "Hi?", 0)]
    outs = {}
    for side in ("left", "right"):
        b = PadCollator(tok.pad_token_id, side=side)(samples)
        pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(b["input_ids"], b["attention_mask"], b["pixel_values"], position_ids=pos)
        outs[side] = (out.logits, b["attention_mask"].bool())
    for row in range(2):
        l = outs["left"][0][row][outs["left"][1][row]]
        r = outs["right"][0][row][outs["right"][1][row]]
        # The same sums over the same tokens; padding moves them and so the kernels' blocking.
        assert_reordered(l, r, TINY_TERMS, TINY_FORWARD)


def test_padding_and_images_never_supervised(tiny_model):
    model, tok = tiny_model
    b = PadCollator(tok.pad_token_id)([sample(model, tok, "<image>\nQ?", 1), sample(model, tok, "Q?", 0, reply="Yes.")])
    lab = b["labels"]
    assert (lab[b["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (lab[b["input_ids"] == model.image_token_id] == IGNORE_INDEX).all()


def test_vision_tower_frozen_forward_has_no_grad(tiny_model):
    model, tok = tiny_model
    for p in model.vision.parameters():
        p.requires_grad_(False)
    b = PadCollator(tok.pad_token_id)([sample(model, tok, "<image>\nQ?", 1)])
    out = model(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"])
    out.loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())


def test_cls_patch_keeps_cls(tokenizer):
    m_patch, _ = make_model(tokenizer, "clip", vision_feature_select="patch")
    m_cls, _ = make_model(tokenizer, "clip", vision_feature_select="cls_patch")
    assert m_cls.config.num_image_tokens == m_patch.config.num_image_tokens + 1
    m_sig, _ = make_model(tokenizer, "siglip", vision_feature_select="patch")
    assert m_sig.config.num_image_tokens == 16  # SigLIP has no CLS token to drop


def test_conv_tower_from_a_directory_uses_its_preprocessor_size(tokenizer, tmp_path):
    # A ResNet checkpoint says nothing about its input size; preprocessor_config.json does.
    from transformers import ResNetConfig, ResNetModel

    from vistune.data.images import ImageConfig
    from vistune.model.build import build_vlm
    from vistune.model.checkpoint import image_processor_dict, load_model, save_model, write_json
    from vistune.model.tiny import tiny_text_config

    net = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 1, 1],
                                   layer_type="basic", downsample_in_first_stage=False))
    net.save_pretrained(tmp_path / "cnn")
    write_json(tmp_path / "cnn" / "preprocessor_config.json", image_processor_dict(ImageConfig(size=64)))
    model, tok = build_vlm(str(tmp_path / "cnn"), tiny_text_config(vocab_size=len(tokenizer)), tokenizer,
                           vision_feature_layer=-2)
    # 64 px -> /4 stem -> 16x16 -> stage 2 halves it: an 8x8 map of the 16-wide stage.
    assert model.config.image.size == 64
    assert model.config.num_image_tokens == 64
    assert model.vision.hidden_size == 16
    feats = model.vision(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, 64, 16)
    save_model(model, tok, tmp_path / "vlm")
    loaded, _ = load_model(tmp_path / "vlm")
    assert loaded.config.num_image_tokens == 64 and loaded.vision.image_size == 64


def test_the_loss_is_the_mean_over_supervised_next_tokens(tiny_model):
    model, tok = tiny_model
    b = PadCollator(tok.pad_token_id)([sample(model, tok, "<image>\nQ?", 1), sample(model, tok, "Q?", 0, reply="Yes.")])
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"])
        none = model(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=torch.full_like(b["labels"], -100))
    target = b["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    logp = out.logits[:, :-1][keep].float().log_softmax(-1)
    want = -logp.gather(-1, target[keep][:, None]).mean()
    assert out.num_supervised == int(keep.sum()) > 0
    assert_reordered(out.loss, want, TINY_TERMS, TINY_FORWARD)
    assert none.num_supervised == 0 and float(none.loss) == 0.0
