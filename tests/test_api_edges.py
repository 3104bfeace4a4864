"""albef.api and the `albef` command at the edges: empty inputs give empty results of the right
shape or a clear ValueError, bad counts and devices are refused before any work, and the command
reports every such mistake as one `error:` line with exit status 2."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from albef import ALBEFInference
from albef.cli import run
from tests.test_api import CAPTIONS, setup  # noqa: F401 - the tiny checkpoints of every kind

EMBED_DIM = 16  # tests.tiny.TINY_MODEL


@pytest.fixture(scope='module')
def retrieval(setup):  # noqa: F811
    return ALBEFInference.from_checkpoint(setup[2]['retrieval'], device='cpu')


@pytest.fixture(scope='module')
def vqa(setup):  # noqa: F811
    return ALBEFInference.from_checkpoint(setup[2]['vqa'], device='cpu')


def test_empty_inputs_give_empty_results_of_the_right_shape(setup, retrieval):  # noqa: F811
    image = setup[3][0]
    assert retrieval.image_embeddings([]).shape == (0, EMBED_DIM)
    assert retrieval.text_embeddings([]).shape == (0, EMBED_DIM)
    assert retrieval.preprocess_images([]).shape == (0, 3, 32, 32)
    for images, texts in ((image, []), ([], 'a circle'), ([], []), ([image], [])):
        scores = retrieval.itm_scores(images, texts)
        assert scores.shape == (0,) and scores.dtype == torch.float32
    with pytest.raises(ValueError, match='0 images and 2 texts'):
        retrieval.itm_scores([], CAPTIONS[:2])
    for gallery in ([], retrieval.encode_texts([])):
        assert retrieval.retrieve_texts(image, gallery) == []
    assert retrieval.encode_images([]).features.shape == (0, EMBED_DIM)
    assert retrieval.retrieve_images('a circle', []) == []
    # and one item still works next to the empty cases
    assert retrieval.itm_scores(image, CAPTIONS[:1]).shape == (1,)


def test_counts_must_be_positive(setup, retrieval, vqa):  # noqa: F811
    image = setup[3][0]
    for k, k_test in ((0, None), (-3, None), (2.5, None), (True, None), (3, 0), (3, -1)):
        with pytest.raises(ValueError, match='must be a positive integer'):
            retrieval.retrieve_texts(image, CAPTIONS, k=k, k_test=k_test)
        with pytest.raises(ValueError, match='must be a positive integer'):
            vqa.answer(image, 'what color?', ['red'], k=k, k_test=k_test)
    with pytest.raises(ValueError, match='must be a positive integer'):
        retrieval.retrieve_images(CAPTIONS[0], setup[3], k=-1)
    assert len(retrieval.retrieve_texts(image, CAPTIONS, k=np.int64(2))) == 2


def test_answer_candidates(setup, vqa):  # noqa: F811
    image = setup[3][0]
    with pytest.raises(ValueError, match='answer needs at least one candidate answer'):
        vqa.answer(image, 'what color?', [])
    with pytest.raises(TypeError, match='candidate answers are strings'):
        vqa.answer(image, 'what color?', ['red', 3])
    # one string is one candidate, not a list of its letters
    assert [a['answer'] for a in vqa.answer(image, 'what color?', 'red')] == ['red']


def test_gradcam_and_classify_refuse_what_they_cannot_use(setup, retrieval):  # noqa: F811
    image = setup[3][0]
    with pytest.raises(ValueError, match='at least one word'):
        retrieval.gradcam(image, '?!')
    with pytest.raises(TypeError, match='one text'):
        retrieval.gradcam(image, [])
    nlvr = ALBEFInference.from_checkpoint(setup[2]['nlvr'], device='cpu')
    for images in ([], 'ab', [image]):
        with pytest.raises(ValueError, match='pair of images'):
            nlvr.classify(images, 'two circles')


def test_sixteen_bit_pil_image_embeds_as_its_file(tmp_path, retrieval):
    gradient = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))
    Image.fromarray(gradient).save(tmp_path / 'deep.png')
    with Image.open(tmp_path / 'deep.png') as opened:
        assert torch.equal(retrieval.image_embeddings(opened),
                           retrieval.image_embeddings(str(tmp_path / 'deep.png')))
    assert torch.equal(retrieval.image_embeddings(gradient),
                       retrieval.image_embeddings(str(tmp_path / 'deep.png')))


def test_unusable_device_is_a_clear_error_before_loading(setup, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        ALBEFInference.from_checkpoint('no-such-file.pth', device='cuda')
    with pytest.raises(ValueError, match="device 'gpu0': not a torch device"):
        ALBEFInference.from_checkpoint(setup[2]['retrieval'], device='gpu0')


def command_error(capsys, argv):
    """(exit status, the last stderr line) of `albef argv` expected to fail."""
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    return exit_.value.code, lines[-1]


def test_command_line_mistakes_are_one_line_errors(setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    _, _, ckpts, images, _ = setup
    vqa = ['answer', '--checkpoint', str(ckpts['vqa']), '--device', 'cpu', '--image', images[0],
           '--question', 'what color?']
    (tmp_path / 'none.json').write_text('[]')
    (tmp_path / 'numbers.json').write_text('[1, 2]')
    (tmp_path / 'broken.json').write_text('["red",')
    for answers, message in ((tmp_path / 'none.json', 'at least one candidate answer'),
                             ('[]', 'at least one candidate answer'),
                             (tmp_path / 'numbers.json', 'a JSON list of strings'),
                             (tmp_path / 'broken.json', 'broken.json: not JSON'),
                             (tmp_path / 'missing.json', 'missing.json: no such file')):
        code, line = command_error(capsys, [*vqa, '--answers', str(answers)])
        assert code == 2 and line.startswith('error: --answers') and message in line, line
    for k in ('0', '-3'):
        code, line = command_error(capsys, [*vqa, '--k', k])
        assert code == 2 and f'error: argument --k: must be a positive integer, got {k}' in line
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    code, line = command_error(capsys, [*vqa[:3], '--device', 'cuda', *vqa[5:]])
    assert code == 2 and line.startswith("error: device 'cuda': CUDA is not available"), line
    code, line = command_error(capsys, ['embed-texts', '--checkpoint', str(ckpts['retrieval']),
                                        '--out', str(tmp_path / 't.npy')])
    assert code == 2 and line.startswith('error: embed-texts needs --texts or --file'), line
    code, line = command_error(capsys, ['embed-images', '--checkpoint', str(ckpts['retrieval']),
                                        '--images', str(tmp_path), '--out', str(tmp_path / 'i.txt')])
    assert code == 2 and line.startswith('error: --out must end in .pt or .npy'), line
    cut = tmp_path / 'cut.jpg'
    cut.write_bytes(open(images[0], 'rb').read()[:300])
    code, line = command_error(capsys, ['score', '--checkpoint', str(ckpts['retrieval']),
                                        '--image', str(cut), '--captions', 'a circle'])
    assert code == 2 and line.startswith(f'error: cannot read image {cut}: OSError'), line
    # a good inline list of answers works
    answers = run([*vqa, '--answers', json.dumps(['red', 'blue']), '--k', '1'])
    assert len(answers) == 1 and answers[0]['answer'] in ('red', 'blue')
