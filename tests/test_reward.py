"Reward model: the transformers CLIPModel backbone loaded with from_pretrained, and the condition mask on hand-made features."
import torch

from instructengine.reward import MPSConfig, MPSModel, condition_mask, load_backbone
from instructengine.sandbox_generator import clip_tokenizer


def test_hf_clip_backbone_extends_clip_features(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path); clip_tokenizer(77).save_pretrained(tmp_path)
    bb = load_backbone(f"hf:{tmp_path}")
    ids = bb.tokenize(["two red circles on the left", "a cat"])
    assert ids.shape == (2, 77) and bb.valid(ids).sum(1).tolist() == [8, 4]     # BOS, the words, EOS
    with torch.no_grad():
        tokens, eos = bb.encode_text(ids)
        px = torch.randn(2, 3, 32, 32)
        assert torch.allclose(eos, bb.model.get_text_features(input_ids=ids).pooler_output, atol=1e-6)
        assert bb.encode_image(px).shape == (2, 17, 16) and tokens.shape == (2, 77, 16)
        assert torch.allclose(bb.encode_image(px, norm=True)[:, 0], bb.model.get_image_features(pixel_values=px).pooler_output, atol=1e-6)
        model = MPSModel(MPSConfig(backbone=f"hf:{tmp_path}", layers=1, heads=2), backbone=bb).eval()
        scores = model(px, ids, model.condition_ids(["semantic", "overall"]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_condition_mask_normalises_per_prompt_and_ignores_padding():
    text = torch.tensor([[[1.0, 0], [0, 2.0], [0.5, 0.5], [9.0, 9.0]]])   # the last token is padding
    cond = torch.tensor([[[1.0, 0], [0, 1.0], [50.0, 50.0]]])              # so is the last condition token
    tv, cv = torch.tensor([[True, True, True, False]]), torch.tensor([[True, True, False]])
    keep, sim = condition_mask(text, tv, cond, cv, threshold=0.3)
    assert torch.allclose(sim, torch.tensor([[0.5, 1.0, 0.25, 0.0]]))        # max over real condition tokens, / the prompt's max
    assert keep.tolist() == [[True, True, False, False]]
    assert condition_mask(text, tv, cond, cv, threshold=0.01)[0].tolist() == [[True, True, True, False]]
