"""Generation with the KV cache against a no-cache reference loop written the original's way (spec §5).

The tiny model's LM head is rewired so that greedy decoding follows known chains: with a 2-layer model at init
scale the final state is dominated by the current token's embedding, so lm_head[next] = 50 * e[current] / |e|
makes ``current -> next`` the argmax. This gives answers with one [SEG] and EOS, with none (stopping at
max_new_tokens), and with several [SEG], in left-padded batches of prompts of different lengths.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dataset.conversation import insert_image_tokens, render_prompt, tokenize_with_image
from model.generation import GenerationResult
from model.sam import predict_masks
from model.sasp import seg_image_similarity, similarity_as_points
from tests.helpers.models import sam_input_size, tiny_read_model
from tests.helpers.tokenizer import tiny_tokenizer

SEG, IM_START, EOS = 1000, 1001, 2
A, B, C, D, F, X, Y = 500, 600, 650, 700, 750, 800, 950
SIZES = [(60, 80), (90, 50), (47, 47)]


def _rewire(model, chain: list[tuple[int, int]]):
    """lm_head[dst] = 50 * sum of the unit embeddings of the tokens that should be followed by dst."""
    model = copy.deepcopy(model)
    emb = model.model.embed_tokens.weight.detach()
    sources = [src for src, _ in chain]
    assert len(set(sources)) == len(sources)
    with torch.no_grad():
        for dst in {dst for _, dst in chain}:
            model.lm_head.weight[dst] = sum(50 * emb[s] / emb[s].norm() for s, d in chain if d == dst)
    return model


@pytest.fixture(scope="module")
def setup():
    base = tiny_read_model(seed=2)
    tok = tiny_tokenizer()
    questions = ["Where is the cat?", "Please segment the big red umbrella near the door.", "Is there a dog?"]
    prompts = [
        tokenize_with_image(insert_image_tokens(render_prompt([("<image>\n" + q, None)], "vicuna_v1")), tok)
        for q in questions
    ]
    colon = prompts[0][-1]
    assert colon not in (A, B, C, D, F, X, Y, SEG, EOS)
    prompts[1] = prompts[1] + [X]
    prompts[2] = prompts[2] + [Y]
    g = torch.Generator().manual_seed(5)
    images_clip = torch.randn(3, 3, 336, 336, generator=g)
    image = torch.randn(1, 3, 1024, 1024, generator=g)
    embedding = base.encode_images_sam(image)
    shapes = [[sam_input_size(h, w), (h, w)] for h, w in SIZES]
    eos_model = _rewire(base, [(colon, A), (A, SEG), (SEG, B), (B, EOS), (X, C), (C, D), (D, SEG), (Y, Y)])
    loop_model = _rewire(base, [(colon, A), (A, SEG), (SEG, B), (B, F), (F, SEG), (X, C), (C, D), (D, SEG), (Y, Y)])
    eos_results = eos_model.generate_masks(
        images_clip, None, prompts, shapes, max_new_tokens=8, image_embeddings=embedding.expand(3, -1, -1, -1)
    )
    return dict(
        prompts=prompts, images_clip=images_clip, image=image, embedding=embedding, shapes=shapes,
        eos_model=eos_model, loop_model=loop_model, eos_results=eos_results,
    )


@torch.no_grad()
def reference(model, image_clip, embedding, ids, shape, max_new_tokens):
    """The original evaluate(): no cache, the whole sequence every step, SEG mask = seq[1:] == SEG left-padded
    with 575 False over the last step's states, image at the first <im_start> + 1; one SasP per [SEG]."""
    seq = torch.tensor([ids])
    feats = model.model.encode_images(image_clip[None])
    for _ in range(max_new_tokens):
        hidden = model.language_model_forward(model.model.prepare_multimodal(seq, feats)).last_hidden_state
        nxt = model.lm_head(hidden[:, -1]).argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        if int(nxt) == EOS:
            break
    mask = torch.cat([torch.zeros(1, 575, dtype=torch.bool), seq[:, 1:] == SEG], 1)
    assert mask.shape[1] == hidden.shape[1]
    seg_hidden = hidden[mask]
    n = seg_hidden.shape[0]
    p = int((seq[0] == IM_START).nonzero()[0])
    image_hidden = hidden[0, p + 1 : p + 577][None].expand(n, -1, -1)
    out = {"tokens": seq[0, len(ids) :].tolist(), "n": n}
    if n:
        sim = seg_image_similarity(image_hidden, seg_hidden)
        points, labels = similarity_as_points(sim, [shape[1]] * n, model.config.sasp_config())
        text = model.model.text_hidden_fcs[0](seg_hidden)
        logits = predict_masks(model.model.visual_model, embedding, points, labels, text, shape[0], shape[1])
        out.update(similarity=sim, points=points, labels=labels, logits=logits)
    return out


def _compare(result: GenerationResult, ref: dict) -> None:
    assert result.token_ids == ref["tokens"]
    assert len(result.masks) == len(result.mask_logits) == len(result.points) == ref["n"]
    if ref["n"] == 0:
        assert not result.present and not result.mask.any()
        return
    torch.testing.assert_close(torch.stack(result.similarity), ref["similarity"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(result.points), ref["points"], rtol=0, atol=1e-3)
    assert torch.equal(torch.stack(result.point_labels), ref["labels"])
    logits = torch.stack(result.mask_logits)
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-4)
    clear = ref["logits"].abs() > 1e-3
    assert torch.equal(torch.stack(result.masks)[clear], (ref["logits"] > 0)[clear])
    assert torch.equal(result.mask, result.masks[0])
    assert result.present == bool(result.masks[0].any())


def test_kv_cache_batch_matches_no_cache_reference(setup) -> None:
    model, max_new, results = setup["eos_model"], 8, setup["eos_results"]
    assert [r.token_ids for r in results] == [[A, SEG, B, EOS], [C, D, SEG, B, EOS], [Y] * max_new]
    for r in range(3):
        ref = reference(model, setup["images_clip"][r], setup["embedding"], setup["prompts"][r], setup["shapes"][r], max_new)
        _compare(results[r], ref)
        assert results[r].mask.shape == SIZES[r]  # each row its own image size
    assert results[2].present is False


def test_several_seg_tokens_each_get_a_mask(setup) -> None:
    model, max_new = setup["loop_model"], 6
    results = model.generate_masks(
        setup["images_clip"][:2], None, setup["prompts"][:2], setup["shapes"][:2], max_new_tokens=max_new,
        image_embeddings=setup["embedding"].expand(2, -1, -1, -1),
    )
    assert results[0].token_ids == [A, SEG, B, F, SEG, B]  # no EOS: stops at max_new_tokens
    assert results[1].token_ids == [C, D, SEG, B, F, SEG]  # [SEG] as the very last token
    assert [len(r.masks) for r in results] == [2, 2]
    for r in range(2):
        ref = reference(model, setup["images_clip"][r], setup["embedding"], setup["prompts"][r], setup["shapes"][r], max_new)
        _compare(results[r], ref)
    # different SEG states give different prompts
    assert not torch.equal(results[0].similarity[0], results[0].similarity[1])


def test_images_path_and_input_checks(setup) -> None:
    model = setup["eos_model"]
    via_images = model.generate_masks(
        setup["images_clip"][:1], setup["image"], setup["prompts"][:1], setup["shapes"][:1], max_new_tokens=6
    )[0]
    via_embedding = setup["eos_results"][0]  # same prompt, CLIP input and image, in a padded batch of 3
    assert via_images.token_ids == via_embedding.token_ids == [A, SEG, B, EOS]
    torch.testing.assert_close(via_images.mask_logits[0], via_embedding.mask_logits[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prompt 0 holds 0 image placeholders"):
        model.generate_masks(setup["images_clip"][:1], setup["image"], [[1, 5, 6]], setup["shapes"][:1])
    with pytest.raises(ValueError, match="2 prompts need 2 rows of images_clip"):
        model.generate_masks(setup["images_clip"][:1], setup["image"], setup["prompts"][:2], setup["shapes"][:2])
