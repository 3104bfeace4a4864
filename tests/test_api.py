"""albef.api and `python -m albef` on tiny checkpoints of every task kind built here (random
weights, saved in the task scripts' layout {'model', 'config'}), checked against direct calls of
the task models loaded independently."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import utils
from albef import ALBEFInference, KindError
from albef.cli import main
from dataset.images import load_image
from dataset.transforms import create_transform
from dataset.utils import pre_caption, pre_question
from models import model_nlvr, model_pretrain, model_pretrain_nlvr, model_retrieval, model_ve, model_vqa
from models.tokenization_bert import BertTokenizer
from tests.tiny import synthetic_with_pretrained, tiny_config

CAPTIONS = ['a large green triangle', 'a small orange circle at the bottom', 'three shapes',
            'a red square, and a BLUE cross!', 'an empty background', 'a purple diamond']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    data, pretrained = synthetic_with_pretrained(tmp_path_factory.mktemp('synthetic'))
    tokenizer = BertTokenizer.from_pretrained(str(data / 'tokenizer'))
    ckpts = {}

    def save(kind, model, config):
        ckpts[kind] = data / f'{kind}.pth'
        utils.save_checkpoint({'model': model.state_dict(), 'config': config, 'epoch': 0}, ckpts[kind])

    config = utils.load_config(data / 'pretrain.yaml')
    utils.save_checkpoint({'model': torch.load(pretrained)['model'], 'config': config},
                          data / 'pretrain.pth')
    ckpts['pretrain'] = data / 'pretrain.pth'
    torch.manual_seed(1)
    # Two fusion layers (1 and 2): Grad-CAM's word maps are zero in the last one.
    bert = json.loads((data / 'config_bert.json').read_text())
    (data / 'config_bert_3.json').write_text(json.dumps({**bert, 'num_hidden_layers': 3}))
    config = tiny_config('Retrieval.yaml', data, data / 'retrieval.yaml', queue_size=16, k_test=4,
                         bert_config=str(data / 'config_bert_3.json'))
    save('retrieval', model_retrieval.ALBEF(config=config, tokenizer=tokenizer), config)
    config = tiny_config('VQA.yaml', data, data / 'vqa.yaml', k_test=6)
    save('vqa', model_vqa.ALBEF(config=config, tokenizer=tokenizer), config)
    config = tiny_config('VE.yaml', data, data / 've.yaml', distill=False)
    save('ve', model_ve.ALBEF(config=config, tokenizer=tokenizer), config)
    config = tiny_config('NLVR.yaml', data, data / 'nlvr.yaml')
    save('nlvr', model_nlvr.ALBEF(config=config, tokenizer=tokenizer), config)
    config = tiny_config('NLVR_pretrain.yaml', data, data / 'ta.yaml')
    save('pretrain_nlvr', model_pretrain_nlvr.ALBEF(config=config, tokenizer=tokenizer), config)
    images = sorted((data / 'images').glob('re_test_*.jpg'))[:6]
    return data, pretrained, ckpts, [str(p) for p in images], tokenizer


def reference_model(module, path, tokenizer, **kwargs):
    """The task model loaded with plain load_state_dict, independent of albef.api."""
    checkpoint = torch.load(path, weights_only=False)
    model = module.ALBEF(config=checkpoint['config'], tokenizer=tokenizer, **kwargs)
    model.load_state_dict(checkpoint['model'])
    return model.eval(), checkpoint['config']


def pixels_of(images, config):
    transform = create_transform('test', config['image_res'])
    return torch.stack([transform(load_image(p)) for p in images])


def captions_of(tokenizer, texts):
    return tokenizer([pre_caption(t, 30) for t in texts], padding='longest', return_tensors='pt')


@pytest.mark.parametrize('kind, module, kwargs', [('pretrain', model_pretrain, {'init_deit': False}),
                                                  ('retrieval', model_retrieval, {})])
def test_embeddings_and_itm_equal_the_model(setup, kind, module, kwargs):
    data, _, ckpts, images, tokenizer = setup
    api = ALBEFInference.from_checkpoint(ckpts[kind], device='cpu')
    api.batch_size = 2  # 3 images / 4 texts: several batches, a partial last one
    model, config = reference_model(module, ckpts[kind], tokenizer, **kwargs)
    pixels = pixels_of(images[:3], config)
    text = captions_of(tokenizer, CAPTIONS[:4])
    # paths, a PIL image and a uint8 array give the same preprocessed tensor
    inputs = [images[0], load_image(images[1]), np.asarray(load_image(images[2]))]
    assert torch.equal(api.preprocess_images(inputs), pixels)
    with torch.no_grad():
        image_embeds, image_feat, text_embeds, text_feat = model.encode(pixels, text)
    assert torch.allclose(api.image_embeddings(inputs), image_feat, atol=1e-5)
    assert torch.allclose(api.text_embeddings(CAPTIONS[:4]), text_feat, atol=1e-5)
    assert torch.allclose(api.image_embeddings(inputs).norm(dim=1), torch.ones(3))
    assert torch.equal(api.image_embeddings(inputs[1]), api.image_embeddings(inputs[1:2]))  # one
    assert torch.equal(api.text_embeddings(CAPTIONS[0]), api.text_embeddings(CAPTIONS[:1]))

    with torch.no_grad():  # pairs (image b, text b)
        hidden = model.fusion(text_embeds[:3], text.attention_mask[:3], image_embeds)
        logits = model.itm_head(hidden[:, 0])
    assert torch.allclose(api.itm_scores(inputs, CAPTIONS[:3]), logits.softmax(1)[:, 1], atol=1e-5)
    assert torch.allclose(api.itm_scores(inputs, CAPTIONS[:3], logits=True), logits[:, 1], atol=1e-5)
    # one image against every text = the same image repeated
    one = api.itm_scores(images[0], CAPTIONS[:4])
    assert torch.allclose(one, api.itm_scores([images[0]] * 4, CAPTIONS[:4]), atol=1e-6)
    with pytest.raises(ValueError, match='equal numbers'):
        api.itm_scores(images[:2], CAPTIONS[:3])


def test_retrieval_shortlists_by_itc_and_ranks_by_itm(setup):
    _, _, ckpts, images, _ = setup
    api = ALBEFInference.from_checkpoint(ckpts['retrieval'], device='cpu')
    assert api.config['k_test'] == 4
    cosine = api.image_embeddings([images[0]])[0] @ api.text_embeddings(CAPTIONS).t()
    found = api.retrieve_texts(images[0], CAPTIONS, k=3)  # the config's k_test: 4 of 6
    assert len(found) == 3
    assert {r['index'] for r in found} <= set(cosine.topk(4).indices.tolist())
    logits = [r['itm_logit'] for r in found]
    assert logits == sorted(logits, reverse=True)
    direct = api.itm_scores(images[0], [r['item'] for r in found], logits=True)
    assert torch.allclose(torch.tensor(logits), direct, atol=1e-5)
    assert all(r['item'] == CAPTIONS[r['index']] for r in found)
    itc = [float(cosine[r['index']]) for r in found]
    assert [r['itc'] for r in found] == pytest.approx(itc, abs=1e-5)
    # a shortlist of everything: the full ITM ranking
    full = api.retrieve_texts(images[0], api.encode_texts(CAPTIONS), k=6, k_test=100)
    all_logits = api.itm_scores(images[0], CAPTIONS, logits=True)
    assert [r['index'] for r in full] == all_logits.argsort(descending=True).tolist()

    gallery = api.encode_images(images)
    found = api.retrieve_images(CAPTIONS[1], gallery, k=2, k_test=3)
    cosine = api.text_embeddings([CAPTIONS[1]])[0] @ gallery.features.t()
    assert {r['index'] for r in found} <= set(cosine.topk(3).indices.tolist())
    direct = api.itm_scores([images[r['index']] for r in found], CAPTIONS[1], logits=True)
    assert [r['itm_logit'] for r in found] == pytest.approx(direct.tolist(), abs=1e-5)
    assert found[0]['itm_logit'] >= found[1]['itm_logit']


def test_vqa_answer_is_the_models_top_answer(setup):
    data, _, ckpts, images, tokenizer = setup
    api = ALBEFInference.from_checkpoint(ckpts['vqa'], device='cpu')
    model, config = reference_model(model_vqa, ckpts['vqa'], tokenizer)
    answer_list = json.loads((data / 'answer_list.json').read_text())
    question = 'What is the color of the square?'
    with torch.no_grad():
        ids, probs = model(pixels_of(images[:1], config),
                           tokenizer([pre_question(question, 50)], return_tensors='pt'),
                           tokenizer([a + '[SEP]' for a in answer_list], padding='longest',
                                     return_tensors='pt'), k=6, train=False)
    answers = api.answer(images[0], question, answer_list, k=3)
    assert [a['answer'] for a in answers] == [answer_list[i] for i in ids[0, :3].tolist()]
    assert [a['score'] for a in answers] == pytest.approx(probs[0, :3].tolist(), abs=1e-5)
    assert api.answer(images[0], question, k=3) == answers  # the config's answer_list by default
    assert len(api.answer(images[0], question, ['yes', 'no'], k=5)) == 2


def test_classification_heads(setup):
    _, _, ckpts, images, tokenizer = setup
    ve = ALBEFInference.from_checkpoint(ckpts['ve'], device='cpu')
    model, config = reference_model(model_ve, ckpts['ve'], tokenizer)
    probs = ve.classify(images[0], 'The shape is large.')
    with torch.no_grad():
        expected = model(pixels_of(images[:1], config), captions_of(tokenizer, ['The shape is large.']),
                         None, train=False).softmax(1)[0]
    assert probs == pytest.approx({'entailment': float(expected[2]), 'neutral': float(expected[1]),
                                   'contradiction': float(expected[0])}, abs=1e-5)
    nlvr = ALBEFInference.from_checkpoint(ckpts['nlvr'], device='cpu')
    assert set(nlvr.classify(images[:2], 'both images have a circle')) == {'True', 'False'}
    with pytest.raises(ValueError, match='pair'):
        nlvr.classify(images[:1], 'a circle')


def test_gradcam_maps_at_the_image_resolution(setup):
    _, _, ckpts, images, _ = setup
    api = ALBEFInference.from_checkpoint(ckpts['retrieval'], device='cpu')
    array = np.asarray(load_image(images[0]).resize((56, 40)))  # W 56, H 40
    maps = api.gradcam(array, 'The red circle.', block_num=1)
    assert maps.tokens == ['the', 'red', 'circle']
    assert maps.token_maps.shape == (3, 40, 56) and maps.average.shape == (40, 56)
    assert torch.isfinite(maps.token_maps).all() and maps.token_maps.abs().sum() > 0
    assert torch.allclose(maps.average, maps.token_maps.mean(0), atol=1e-5)
    assert torch.equal(api.gradcam(array, 'The red circle.').average, maps.average)  # the default
    assert api.gradcam(array, 'The red circle.', block_num=2).token_maps.abs().max() == 0  # last layer
    with pytest.raises(ValueError, match='fusion layers'):
        api.gradcam(array, 'a circle', block_num=0)
    assert all(p.grad is None for p in api.model.parameters())  # no gradients left behind


def test_kind_errors_and_configs(setup):
    data, pretrained, ckpts, images, _ = setup
    vqa = ALBEFInference.from_checkpoint(ckpts['vqa'], device='cpu')
    for call in (lambda: vqa.itm_scores(images[0], 'a circle'), lambda: vqa.image_embeddings(images),
                 lambda: vqa.gradcam(images[0], 'a circle'), lambda: vqa.classify(images[0], 'x')):
        with pytest.raises(KindError, match="'vqa' checkpoint"):
            call()
    retrieval = ALBEFInference.from_checkpoint(ckpts['retrieval'], device='cpu')
    with pytest.raises(KindError, match="answer needs the answer decoder .*'retrieval'"):
        retrieval.answer(images[0], 'what color?', ['red'])
    ta = ALBEFInference.from_checkpoint(ckpts['pretrain_nlvr'], device='cpu')
    with pytest.raises(KindError, match='pretrain / retrieval / grounding'):
        ta.text_embeddings(['a circle'])
    # a released-style file stores no config: an explicit YAML is required
    with pytest.raises(ValueError, match='stores no config'):
        ALBEFInference.from_checkpoint(pretrained, device='cpu')
    released = ALBEFInference.from_checkpoint(pretrained, config=data / 'pretrain.yaml', device='cpu')
    assert released.kind == 'pretrain'
    assert torch.equal(released.text_embeddings(CAPTIONS),
                       ALBEFInference.from_checkpoint(ckpts['pretrain']).text_embeddings(CAPTIONS))


def test_command_line(setup, tmp_path, capsys):
    data, _, ckpts, images, _ = setup
    folder = tmp_path / 'imgs'
    (folder / 'sub').mkdir(parents=True)
    for i, path in enumerate(images[:3]):
        shutil.copy(path, folder / ('sub' if i == 2 else '') / f'{i}.jpg')
    (folder / 'notes.txt').write_text('not an image')
    common = ['--checkpoint', str(ckpts['retrieval']), '--device', 'cpu']
    api = ALBEFInference.from_checkpoint(ckpts['retrieval'], device='cpu')

    main(['embed-images', *common, '--images', str(folder), '--out', str(tmp_path / 'i.pt')])
    saved = torch.load(tmp_path / 'i.pt')
    assert saved['paths'] == [str(folder / '0.jpg'), str(folder / '1.jpg'), str(folder / 'sub/2.jpg')]
    assert torch.allclose(saved['features'], api.image_embeddings(images[:3]), atol=1e-6)
    main(['embed-images', *common, '--images', str(folder), '--out', str(tmp_path / 'i.npy')])
    assert np.allclose(np.load(tmp_path / 'i.npy'), saved['features'].numpy())
    assert json.loads((tmp_path / 'i.paths.json').read_text()) == saved['paths']
    main(['embed-texts', *common, '--texts', *CAPTIONS[:2], '--out', str(tmp_path / 't.npy')])
    assert np.allclose(np.load(tmp_path / 't.npy'), api.text_embeddings(CAPTIONS[:2]).numpy(), atol=1e-6)
    assert json.loads((tmp_path / 't.texts.json').read_text()) == CAPTIONS[:2]

    rows = main(['score', *common, '--image', images[0], '--captions', *CAPTIONS[:3]])
    itm = api.itm_scores(images[0], CAPTIONS[:3]).tolist()
    assert [r['caption'] for r in rows] == [CAPTIONS[i] for i in np.argsort(itm)[::-1]]
    assert sorted(r['itm'] for r in rows) == pytest.approx(sorted(itm), abs=1e-6)
    assert CAPTIONS[0] in capsys.readouterr().out

    (tmp_path / 'answers.json').write_text(json.dumps(['red', 'blue', 'green']))
    answers = main(['answer', '--checkpoint', str(ckpts['vqa']), '--device', 'cpu', '--image',
                    images[0], '--question', 'What color?', '--answers',
                    str(tmp_path / 'answers.json'), '--k', '2'])
    assert len(answers) == 2 and {a['answer'] for a in answers} <= {'red', 'blue', 'green'}

    paths = main(['gradcam', *common, '--image', images[0], '--text', 'the red circle', '--out',
                  str(tmp_path / 'cam')])
    assert sorted(p.name for p in (tmp_path / 'cam').glob('*.png')) == [
        '00_average.png', '01_the.png', '02_red.png', '03_circle.png'] == sorted(
        p.split('/')[-1] for p in paths)
    with Image.open(tmp_path / 'cam' / '02_red.png') as picture, Image.open(images[0]) as original:
        assert picture.size == original.size
    with pytest.raises(KindError):
        main(['score', '--checkpoint', str(ckpts['vqa']), '--device', 'cpu', '--image', images[0],
              '--captions', 'a'])



@pytest.mark.parametrize('kind', ['pretrain', 'retrieval', 'grounding', 'online-only', 'vqa',
                                  've', 'nlvr', 'pretrain_nlvr'])
def test_original_layout_files_load_and_match_the_original(setup, tmp_path, kind):
    """The tiny files written by the original code ({'model'} only, as the released ones) load
    strictly with their config; ITC features and ITM logits equal the original's outputs."""
    from tests.reference import load_kind
    tokenizer = setup[4]  # not used by these checks
    config, path, inputs, expected = load_kind('retrieval' if kind == 'online-only' else kind)
    if kind == 'online-only':  # as mscoco.pth / refcoco.pth: no momentum models, no queues
        state_dict = torch.load(path)['model']
        path = tmp_path / 'online.pth'
        torch.save({'model': {k: v for k, v in state_dict.items()
                              if not k.split('.')[0].endswith(('_m', '_queue', 'queue_ptr'))}}, path)
    api = ALBEFInference.from_checkpoint(path, config=config, tokenizer=tokenizer, device='cpu')
    assert api.kind == {'grounding': 'retrieval', 'online-only': 'retrieval'}.get(kind, kind)
    if kind not in ('pretrain', 'retrieval', 'online-only'):
        return
    model = api.model  # the encoder API of every ALBEF model
    with torch.no_grad():
        image_embeds = model.encode_image(inputs['image'])
        text_embeds = model.encode_text(inputs['text_ids'], inputs['text_att'])
        itm = model.itm_scores(text_embeds, inputs['text_att'], image_embeds)
    assert torch.allclose(model.image_features(image_embeds), expected['image_feat'], atol=1e-5)
    assert torch.allclose(model.text_features(text_embeds), expected['text_feat'], atol=1e-5)
    assert torch.allclose(itm, expected['itm_logits_pos'], atol=1e-5)
