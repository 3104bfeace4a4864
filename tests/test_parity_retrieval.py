"""Parity of the retrieval model and its evaluation with the original implementation's outputs
(tests/fixtures/original/tiny_a/retrieval, see its README.md)."""
import numpy as np
import pytest
import torch

from models import retrieval_eval
from models.albef_base import sample_negatives
from models.checkpoint import load_checkpoint
from models.model_retrieval import ALBEF, idx_targets
from models.xbert import BertConfig, extended_attention_mask
from tests.reference import STUB_TOKENIZER, assert_close, load_kind, text_batch

EVAL_PREFIXES = ('eval_', 'itm_eval.')


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation (slow on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def fixture():
    return load_kind('retrieval')


def build(fixture):
    config, checkpoint, _, _ = fixture
    # The plain training path (fast_train is tested against it in test_fast_train.py).
    model = ALBEF(config={**config, 'fast_train': False}, text_encoder=None,
                  tokenizer=STUB_TOKENIZER)
    load_checkpoint(model, checkpoint, kind='retrieval')
    return model.eval()


def itc_probes(model, image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha):
    sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m = model.itc_similarities(
        image_feat, text_feat, image_feat_m, text_feat_m)
    loss_ita, _, _ = model.forward_itc(image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha)
    return dict(sim_targets=idx_targets(idx, model.idx_queue), image_feat_m=image_feat_m,
                text_feat_m=text_feat_m, sim_i2t=sim_i2t, sim_t2i=sim_t2i, sim_i2t_m=sim_i2t_m,
                sim_t2i_m=sim_t2i_m, loss_ita=loss_ita)


def static_momentum_features(model, image, text):
    """The teacher features with the weights as stored (no EMA step)."""
    image_feat_m = model.image_features(model.visual_encoder_m(image), momentum=True)
    text_embeds_m = model.encode_text(text.input_ids, text.attention_mask, momentum=True)
    return image_feat_m, model.text_features(text_embeds_m, momentum=True)


@torch.no_grad()
def test_static_probes(fixture):
    _, _, inputs, expected = fixture
    model = build(fixture)
    alpha, idx, att = float(inputs['alpha']), inputs['idx'], inputs['text_att']
    text = text_batch(inputs['text_ids'], att)
    image_embeds, image_feat, text_embeds, text_feat = model.encode(inputs['image'], text)
    got = dict(image_embeds=image_embeds, image_feat=image_feat, text_embeds=text_embeds,
               text_feat=text_feat, fusion_hidden=model.fusion(text_embeds, att, image_embeds))
    image_feat_m, text_feat_m = static_momentum_features(model, inputs['image'], text)
    got.update(itc_probes(model, image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha))
    w_i2t, w_t2i = model.negative_weights(got['sim_i2t'], got['sim_t2i'], idx)
    got.update(itm_neg_weights_i2t=w_i2t, itm_neg_weights_t2i=w_t2i)
    logits = model.itm_logits(image_embeds, text_embeds, att, inputs['neg_img_idx'],
                              inputs['neg_txt_idx'])
    got.update(itm_logits=logits, itm_logits_pos=logits[:4], itm_score_pos=logits[:4, 1])
    got['loss_itm'] = model.forward_itm(image_embeds, text_embeds, att, idx,
                                        neg_img_idx=inputs['neg_img_idx'],
                                        neg_txt_idx=inputs['neg_txt_idx'])
    static = [k for k in expected if not k.startswith(('fwd_', 'seeded_') + EVAL_PREFIXES)]
    assert set(static) == set(got), set(static) ^ set(got)
    for name in static:
        assert_close(got[name], expected[name], name)
    # Mutual positives (same idx) never serve as each other's negatives.
    assert w_i2t[0, 2] == 0 and w_i2t[2, 0] == 0 and w_t2i[0, 2] == 0 and w_t2i[2, 0] == 0


@torch.no_grad()
def test_forward_probes_after_momentum_update(fixture):
    _, _, inputs, expected = fixture
    model = build(fixture)
    alpha, idx = float(inputs['alpha']), inputs['idx']
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    _, image_feat, _, text_feat = model.encode(inputs['image'], text)
    image_feat_m, text_feat_m = model.momentum_features(inputs['image'], text)
    state = model.state_dict()
    params = [k for k in expected if k.startswith('fwd_param.')]
    assert params
    for name in params:
        assert_close(state[name[len('fwd_param.'):]], expected[name], name)
    got = {f'fwd_{k}': v for k, v in
           itc_probes(model, image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha).items()}
    model._dequeue_and_enqueue(image_feat_m, text_feat_m, idx.view(-1, 1))
    got.update(fwd_image_queue=model.image_queue, fwd_text_queue=model.text_queue,
               fwd_idx_queue=model.idx_queue, fwd_queue_ptr=model.queue_ptr)
    names = [k for k in expected if k.startswith('fwd_') and not k.startswith('fwd_param.')]
    assert set(names) == set(got), set(names) ^ set(got)
    for name in names:
        assert_close(got[name], expected[name], name)


def test_seeded_forward_replays_the_original_random_stream(fixture):
    _, _, inputs, expected = fixture
    model = build(fixture)
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    torch.manual_seed(int(inputs['seeded_forward_seed']))
    with torch.no_grad():
        loss_ita, loss_itm = model(inputs['image'], text, alpha=float(inputs['alpha']),
                                   idx=inputs['idx'])
    assert_close(loss_ita, expected['seeded_loss_ita'], 'seeded_loss_ita')
    assert_close(loss_itm, expected['seeded_loss_itm'], 'seeded_loss_itm')
    assert_close(model.idx_queue, expected['fwd_idx_queue'], 'idx_queue after forward')
    assert_close(model.image_queue, expected['fwd_image_queue'], 'image_queue after forward')

    model = build(fixture)  # the draws alone, in the forward's order
    torch.manual_seed(int(inputs['seeded_forward_seed']))
    with torch.no_grad():
        _, image_feat, _, text_feat = model.encode(inputs['image'], text)
        image_feat_m, text_feat_m = model.momentum_features(inputs['image'], text)
        _, sim_i2t, sim_t2i = model.forward_itc(image_feat, text_feat, image_feat_m, text_feat_m,
                                                inputs['idx'], 0.4)
        w_i2t, w_t2i = model.negative_weights(sim_i2t, sim_t2i, inputs['idx'])
        neg_img, neg_txt = sample_negatives(w_t2i), sample_negatives(w_i2t)
    assert torch.equal(neg_img, expected['seeded_neg_img_idx'])
    assert torch.equal(neg_txt, expected['seeded_neg_txt_idx'])


@torch.no_grad()
def test_distill_off_uses_id_targets_only(fixture):
    _, _, inputs, _ = fixture
    model = build(fixture)
    model.distill = False
    sims = torch.randn(4, 20)
    t_i2t, t_t2i = model.itc_targets(inputs['idx'], sims, sims, alpha=0.4)
    ref = idx_targets(inputs['idx'], model.idx_queue)
    assert torch.equal(t_i2t, ref) and torch.equal(t_t2i, ref)
    assert torch.allclose(ref.sum(1), torch.ones(4))
    assert (ref[0] > 0).sum() > 2  # the batch twin (sample 2) and queue entries share idx 3


def fixture_eval_inputs(model, inputs):
    text_embeds, text_feats = retrieval_eval.encode_texts(model, inputs['eval_text_ids'],
                                                          inputs['eval_text_att'], batch_size=5)
    images = inputs['eval_images']
    image_embeds, image_feats = retrieval_eval.encode_images(model, [images[:4], images[4:]])
    sims = retrieval_eval.itc_similarity(image_feats, text_feats)
    return image_embeds, text_embeds, inputs['eval_text_att'], sims


@torch.no_grad()
def test_evaluation_probes_plain_path(fixture):
    config, _, inputs, expected = fixture
    model = build(fixture)
    image_embeds, text_embeds, text_atts, sims = fixture_eval_inputs(model, inputs)
    score_i2t, score_t2i = retrieval_eval.itm_score_matrices_plain(
        model, image_embeds, text_embeds, text_atts, sims, config['k_test'])
    got = {'eval_sims_matrix': sims, 'eval_score_matrix_i2t': score_i2t,
           'eval_score_matrix_t2i': score_t2i}
    metrics = retrieval_eval.itm_eval(score_i2t, score_t2i, inputs['eval_txt2img'].tolist(),
                                      inputs['eval_img2txt'].tolist())
    got.update({f'itm_eval.{k}': torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
    names = [k for k in expected if k.startswith(EVAL_PREFIXES)]
    assert set(names) == set(got), set(names) ^ set(got)
    for name in names:
        assert_close(got[name], expected[name], name)
    # Exactly k_test cells per row are re-scored; the rest is the -100 filler.
    assert ((score_i2t != -100).sum(1) == config['k_test']).all()
    assert ((score_t2i != -100).sum(1) == config['k_test']).all()


def assert_same_scores(fast, plain, name):
    assert torch.equal(fast == -100, plain == -100), f'{name}: different cells re-scored'
    assert_close(fast, plain, name)


@torch.no_grad()
@pytest.mark.parametrize('pair_batch,image_batch,trim', [(256, 32, True), (5, 4, False), (3, 1, True)])
def test_fast_path_equals_plain_on_fixture(fixture, pair_batch, image_batch, trim):
    config, _, inputs, expected = fixture
    model = build(fixture)
    args = fixture_eval_inputs(model, inputs)
    plain = retrieval_eval.itm_score_matrices_plain(model, *args, config['k_test'])
    fast = retrieval_eval.itm_score_matrices(model, *args, config['k_test'], pair_batch=pair_batch,
                                             image_batch=image_batch, trim_padding=trim)
    for f, p, name in zip(fast, plain, ('eval_score_matrix_i2t', 'eval_score_matrix_t2i')):
        assert_same_scores(f, p, name)
        assert_close(f, expected[name], name)


def random_tiny_model(fixture, seed):
    config, _, _, _ = fixture
    torch.manual_seed(seed)
    model = ALBEF(config=config, tokenizer=STUB_TOKENIZER).eval()
    with torch.no_grad():  # random init has near-zero ITM logits; spread them out
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@torch.no_grad()
def test_fast_path_equals_plain_when_k_covers_everything(fixture):
    model = random_tiny_model(fixture, seed=0)
    gen = torch.Generator().manual_seed(1)
    n_img, n_txt, length = 5, 7, 12
    images = torch.randn(n_img, 3, 64, 64, generator=gen)
    lengths = torch.randint(3, length + 1, (n_txt,), generator=gen)
    text_atts = (torch.arange(length)[None] < lengths[:, None]).long()
    text_ids = torch.randint(104, 1000, (n_txt, length), generator=gen) * text_atts
    text_ids[:, 0] = 101
    for k_test in (n_txt, 50):  # k >= number of items: every cell is re-scored
        plain = retrieval_eval.evaluation(model, images, text_ids, text_atts, k_test, fast=False)
        fast = retrieval_eval.evaluation(model, [images[:2], images[2:]], text_ids, text_atts,
                                         k_test, pair_batch=4, image_batch=2)
        assert (plain[0] != -100).all() and (plain[1] != -100).all()
        for f, p, name in zip(fast, plain, ('i2t', 't2i')):
            assert_same_scores(f, p, name)
        assert torch.allclose(fast[0], fast[1].t(), atol=0, rtol=0)  # each pair scored once
        assert plain[0].std() > 1e-2  # the scores are not all alike


def test_fast_path_scores_each_pair_once(fixture):
    sims = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]])
    pairs, i2t_codes, t2i_codes = retrieval_eval.candidate_pairs(sims, k_test=2)
    # i2t: image 0 -> texts 0, 2; image 1 -> texts 1, 2.  t2i: each text -> both images.
    assert pairs.tolist() == [0, 1, 2, 3, 4, 5]
    assert i2t_codes.tolist() == [[0, 2], [4, 5]]
    assert sorted(t2i_codes.flatten().tolist()) == [0, 1, 2, 3, 4, 5]


def test_itm_eval_ranks_by_best_ground_truth():
    scores_i2t = np.array([[0.9, 0.1, 0.5, 0.3],   # image 0: gt {2, 3} -> best rank 1
                           [0.2, 0.8, 0.4, 0.1]],  # image 1: gt {1}    -> rank 0
                          dtype=np.float32)
    scores_t2i = scores_i2t.T.copy()  # text t: its image ranks 0 or 1
    txt2img = [0, 1, 0, 0]  # text 0 -> image 0 (rank 0), 1 -> 1 (0), 2 -> 0 (0), 3 -> 0 (0)
    result = retrieval_eval.itm_eval(scores_i2t, scores_t2i, txt2img, [[2, 3], [1]])
    assert result['txt_r1'] == 50.0 and result['txt_r5'] == 100.0
    assert result['img_r1'] == 100.0
    assert result['txt_r_mean'] == pytest.approx((50 + 100 + 100) / 3)
    assert result['r_mean'] == pytest.approx((result['txt_r_mean'] + result['img_r_mean']) / 2)
    assert list(result) == ['txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5',
                            'img_r10', 'img_r_mean', 'r_mean']


def test_rank_shares_are_balanced_and_cover_every_pair_once():
    """The fast path's ITM pairs per rank: equal shares (within one pair) of a contiguous run,
    so no rank waits long for another in the all-reduce."""
    for count in (0, 3, 10, 1001):
        for world_size in (1, 2, 3, 8):
            shares = [range(count)[retrieval_eval.rank_share(count, r, world_size)]
                      for r in range(world_size)]
            assert [i for share in shares for i in share] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@torch.no_grad()
def test_rank_split_covers_every_cell_once(fixture):
    """Each rank's share, summed as all_reduce would: the fast path then equals the single-
    process matrices; the plain path reproduces the original's -100*(W-1) shift."""
    config, _, inputs, expected = fixture
    model = build(fixture)
    args = fixture_eval_inputs(model, inputs)
    k = config['k_test']
    ref = (expected['eval_score_matrix_i2t'], expected['eval_score_matrix_t2i'])
    for world_size in (2, 4):
        fast = [retrieval_eval.itm_score_matrices(model, *args, k, rank=r, world_size=world_size)
                for r in range(world_size)]
        plain = [retrieval_eval.itm_score_matrices_plain(model, *args, k, rank=r,
                                                         world_size=world_size)
                 for r in range(world_size)]
        for d, name in enumerate(('i2t', 't2i')):
            # Without a process group nothing is reduced: a rank holds 0 for others' pairs.
            summed = sum(parts[d] for parts in fast)
            merged = torch.where(ref[d] == -100, ref[d], summed)
            assert_close(merged, ref[d], f'fast {name} W={world_size}')
            shifted = torch.where(ref[d] == -100, ref[d] * world_size, ref[d] - 100 * (world_size - 1))
            assert_close(sum(parts[d] for parts in plain), shifted, f'plain {name} W={world_size}')


def padded_captions(gen, count, low, high, max_length=30):
    """Captions of `low`..`high` tokens ([CLS] ... [SEP]) padded to `max_length`, as the
    evaluation tokenises them."""
    lengths = torch.randint(low, high + 1, (count,), generator=gen)
    positions = torch.arange(max_length)[None]
    atts = (positions < lengths[:, None]).long()
    ids = torch.randint(104, 1000, (count, max_length), generator=gen) * atts
    ids[:, 0] = 101
    ids[positions == lengths[:, None] - 1] = 102
    return ids, atts


@torch.no_grad()
@pytest.mark.parametrize('fusion_layers', [2, 1])
def test_fast_path_equals_plain_on_padded_captions_of_varied_length(fixture, fusion_layers):
    """Captions of 4..16 tokens padded to 30 (the evaluation's tokenisation): the fast path
    (text self-attention shared per text, pairs grouped by length, padding trimmed, group-wise
    cross-attention, [CLS]-only last layer) gives the plain loop's matrices, also with one
    fusion layer (the first is then the last)."""
    config, _, _, _ = fixture
    bert = BertConfig.from_json_file(config['bert_config']).to_dict()
    bert['fusion_layer'] = bert['num_hidden_layers'] - fusion_layers
    torch.manual_seed(3)
    model = ALBEF(config={**config, 'bert_config': bert}, tokenizer=STUB_TOKENIZER).eval()
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(6, 3, 64, 64, generator=gen)
    text_ids, text_atts = padded_captions(gen, 17, 4, 16)
    plain = retrieval_eval.evaluation(model, images, text_ids, text_atts, 4, fast=False)
    assert plain[0].std() > 1e-2
    for pair_batch, image_batch, trim in ((256, 32, True), (5, 4, True), (3, 1, False),
                                          (7, 2, True)):
        fast = retrieval_eval.evaluation(model, images, text_ids, text_atts, 4,
                                         pair_batch=pair_batch, image_batch=image_batch,
                                         trim_padding=trim)
        for f, p, name in zip(fast, plain, ('i2t', 't2i')):
            assert torch.equal(f == -100, p == -100), name
            assert (f - p).abs().max() < 1e-5, (name, pair_batch, image_batch, trim)


@torch.no_grad()
def test_grouped_key_values_and_cls_rows_equal_the_full_computation(fixture):
    """The fast path's building blocks in xbert: attention against `select_grouped` (each
    image's rows' queries stacked against its keys/values) equals attention against `select`
    (gathered), and a
    layer's `rows` output equals the full output at those positions."""
    model = random_tiny_model(fixture, seed=5)
    bert = model.text_encoder
    gen = torch.Generator().manual_seed(6)
    image_embeds = torch.randn(3, 9, bert.config.encoder_width, generator=gen)
    index = torch.tensor([2, 2, 0, 1, 1, 1, 2])  # unsorted, an image may come back
    hidden = torch.randn(7, 5, bert.config.hidden_size, generator=gen)
    atts = torch.ones(7, 5, dtype=torch.long)
    atts[1, 3:] = 0
    atts[4, 2:] = 0
    mask = extended_attention_mask(atts, hidden.dtype)
    layer = bert.encoder.layer[bert.config.fusion_layer]
    gathered = bert.image_key_values(image_embeds).select(index)
    groups = bert.image_key_values(image_embeds).select_grouped(index)
    assert groups.groups.per_image == 3 and sorted(groups.groups.slot.tolist()) == [0, 3, 4, 5, 6, 7, 8]
    full = layer(hidden, mask, gathered.layer(layer.layer_num))
    grouped = layer(hidden, mask, groups.layer(layer.layer_num))
    assert (full - grouped).abs().max() < 1e-5
    cls = layer(hidden, mask, groups.layer(layer.layer_num), rows=slice(0, 1))
    assert cls.shape == (7, 1, bert.config.hidden_size)
    assert (cls - full[:, :1]).abs().max() < 1e-5
    attention = layer.attention(hidden, mask)
    assert (layer.fuse(attention, gathered.layer(layer.layer_num)) - full).abs().max() < 1e-5


class _Tokenized(dict):
    def __getattr__(self, name):
        return self[name]

    def to(self, device):
        return self


@torch.no_grad()
@pytest.mark.parametrize('options', [{}, {'fast_eval': False}])
def test_the_original_evaluation_call_returns_the_original_matrices(fixture, options):
    """`from Retrieval import evaluation, itm_eval` with the original's arguments (model,
    data_loader, tokenizer, device, config): numpy (i2t, t2i) score matrices equal to the
    original's, then Recall@K. The loader yields (image, index) batches of a dataset with `.text`;
    the tokenizer stands in for BertTokenizer (the fixture's captions are already tokenised)."""
    from Retrieval import evaluation, itm_eval
    config, _, inputs, expected = fixture
    model = build(fixture)
    images = inputs['eval_images']
    captions = [str(t) for t in range(inputs['eval_text_ids'].size(0))]

    def tokenizer(texts, padding, truncation, max_length, return_tensors):
        assert (padding, truncation, max_length) == ('max_length', True, 30)
        rows = [int(t) for t in texts]
        return _Tokenized(input_ids=inputs['eval_text_ids'][rows],
                          attention_mask=inputs['eval_text_att'][rows])

    class Loader(list):
        dataset = type('EvalSet', (), {'text': captions, '__len__': lambda self: len(images)})()
    loader = Loader([(images[:4], torch.arange(4)), (images[4:], torch.arange(4, len(images)))])
    score_i2t, score_t2i = evaluation(model, loader, tokenizer, 'cpu', {**config, **options})
    assert isinstance(score_i2t, np.ndarray) and isinstance(score_t2i, np.ndarray)
    assert_close(torch.from_numpy(score_i2t), expected['eval_score_matrix_i2t'], 'i2t')
    assert_close(torch.from_numpy(score_t2i), expected['eval_score_matrix_t2i'], 't2i')
    metrics = itm_eval(score_i2t, score_t2i, inputs['eval_txt2img'].tolist(),
                       inputs['eval_img2txt'].tolist())
    for key, value in metrics.items():
        assert value == pytest.approx(expected[f'itm_eval.{key}'].item())
