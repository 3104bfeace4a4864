"""tools/unimodal_init.py: the labels it trains the ViT on and its chance level (the training
itself and the loading of its outputs run end to end in tests/test_demo.py)."""
import pytest

from tools.unimodal_init import LABELS, chance_recall, object_labels


def test_object_labels_are_the_coloured_shapes_any_caption_names():
    target = object_labels(['A red circle and a blue square.', 'the Red Circle at the top',
                            'two shapes: small triangle'])  # no colour: no label
    named = {LABELS[i] for i in target.nonzero().flatten().tolist()}
    assert named == {'red circle', 'blue square'}
    assert target.sum() == 2 and target.shape == (len(LABELS),)


def test_chance_recall_is_the_share_of_labels_a_random_top_k_hits():
    records = [{'caption': 'a red circle and a blue square'},       # 2 objects: 2/30 each
               {'caption': ['a green cross', 'a green cross.']}]    # 1 object: 1/30
    # (2 * 2/30 + 1 * 1/30) objects expected among 3 named
    assert chance_recall(records) == pytest.approx((4 / 30 + 1 / 30) / 3)
    assert chance_recall([]) == 0


def test_patch_labels_name_the_object_each_patch_shows():
    from dataset.synthetic import Obj, Scene
    from tools.unimodal_init import PATCH_LABELS, SCENE_SIDE, patch_labels
    # A large red square centred in the top-left cell; at 96 px and a 4 x 4 grid a patch is
    # 24 px: the square (r = 13.4 px around (16, 16)) covers patches 0, 1, 4, 5 of the grid.
    square = Obj('square', 'red', 'large', 0, 0, 16.0, 16.0, 0.14 * SCENE_SIDE)
    cross = Obj('cross', 'blue', 'small', 2, 2, 80.0, 80.0, 0.09 * SCENE_SIDE)
    labels = patch_labels(Scene((square, cross), (220, 220, 220), -1), grid=4)
    assert labels.shape == (16,)
    red_square = 1 + PATCH_LABELS.index(('red', 'square', 'large'))
    blue_cross = 1 + PATCH_LABELS.index(('blue', 'cross', 'small'))
    assert labels[[0, 1, 4, 5]].tolist() == [red_square] * 4
    assert labels[15].item() == blue_cross  # (80, 80) is in the last patch
    assert set(labels.tolist()) == {0, red_square, blue_cross}


def test_patch_centres_follow_the_token_order():
    import torch

    from tools.unimodal_init import patch_centres
    # row-major like the ViT's patch tokens: (x, y), x grows along a row, y down the rows
    assert torch.equal(patch_centres(2), torch.tensor([[-0.5, -0.5], [0.5, -0.5],
                                                       [-0.5, 0.5], [0.5, 0.5]]))
    assert patch_centres(8).shape == (64, 2) and patch_centres(8).abs().max() == 0.875


def test_label_map_covers_the_pixels_render_paints():
    import random

    import numpy as np

    from dataset.synthetic import label_map, render, sample_scene
    rng = random.Random(1)
    for _ in range(5):
        scene = sample_scene(rng, 96)
        scene = type(scene)(scene.objects, scene.background, -1)  # plain background
        painted = (np.array(render(scene, 96)) != np.array(scene.background)).any(-1)
        assert ((label_map(scene, 96, lambda o: 1) > 0) == painted).all()


def test_the_shipped_tiny_vit_is_the_tools_output_for_the_tiny_config():
    """configs/tiny/vit_init.pth (the demo's image-encoder start, as DeiT is the paper's): made
    by tools.unimodal_init, DeiT's layout, and loads strictly into the tiny config's ViT."""
    import torch

    from models.vit import vit_from_config
    from tests.tiny import ROOT
    from tools.unimodal_init import ViTClassifier
    from utils import load_config
    saved = torch.load(ROOT / 'configs/tiny/vit_init.pth', map_location='cpu', weights_only=True)
    assert saved['made_by'].startswith('tools.unimodal_init --vit_scenes ')
    assert saved['checks']['patch_shape'] > 0.5 and saved['labels'] == LABELS
    assert saved['checks']['patch_position_error'] < 0.5  # in patch widths: tokens know where
    config = load_config(ROOT / 'configs/tiny/Pretrain.yaml')
    vit = vit_from_config(config)
    vit.load_state_dict({k: v for k, v in saved['model'].items() if not k.startswith('head.')})
    ViTClassifier.from_file(ROOT / 'configs/tiny/vit_init.pth', config)  # the patch head too


def test_a_vit_file_not_made_by_the_tool_is_a_clear_error(tmp_path, capsys):
    import torch

    from tools import unimodal_init
    from tools.unimodal_init import ViTClassifier
    from utils import load_config
    config = load_config('configs/tiny/Pretrain.yaml')
    deit_only = tmp_path / 'deit.pth'
    torch.save({'model': {}}, deit_only)
    with pytest.raises(ValueError, match="not a ViT saved by tools.unimodal_init"):
        ViTClassifier.from_file(deit_only, config)
    with pytest.raises(SystemExit):
        unimodal_init.main(['--vit', str(tmp_path / 'absent.pth'), '--out', str(tmp_path / 'out')])
    assert 'absent.pth: no such file' in capsys.readouterr().err


def test_position_weight_scales_the_patch_centre_regression():
    """--position_weight: at 0 the centre regression is out of the loss (the regressed centres
    stay as far off as an untrained head's, ~3.3 patch widths); weighted in, the same 100 steps
    bring them closer (~2.1)."""
    import torch

    from tools.unimodal_init import train_vit
    from utils import load_config
    config = load_config('configs/tiny/Pretrain.yaml')
    errors = {}
    for weight in (0.0, 100.0):
        torch.manual_seed(0)
        _, checks = train_vit(config, [], '.', scenes=800, lr=1e-2, batch_size=8,
                              device=torch.device('cpu'), position_weight=weight)
        errors[weight] = checks['patch_position_error']
    assert errors[100.0] < 0.8 * errors[0.0], errors


def test_cell_position_target_classifies_each_patch_column_and_row(tmp_path):
    """--position_target cell: per patch, logits over the grid's columns then its rows; true
    cells scored highest give the true centres and a small loss, and the file keeps the target."""
    import torch

    from tools.unimodal_init import ViTClassifier, patch_centres
    from utils import load_config
    config = load_config('configs/tiny/Pretrain.yaml')
    grid = config['image_res'] // config['patch_size']
    model = ViTClassifier(config, len(LABELS), position_target='cell')
    assert model.position_head.out_features == 2 * grid
    centres = patch_centres(grid)
    columns, rows = torch.arange(grid).repeat(grid), torch.arange(grid).repeat_interleave(grid)
    logits = torch.full((1, grid * grid, 2 * grid), -10.0)
    logits[0, torch.arange(grid * grid), columns] = 10.0
    logits[0, torch.arange(grid * grid), grid + rows] = 10.0
    assert torch.allclose(model.predicted_centres(logits)[0], centres)
    assert model.position_loss(logits, centres) < 1e-6
    assert model.position_loss(logits.roll(1, dims=1), centres) > 1.0  # a patch off: wrong cells
    model.save(tmp_path / 'vit.pth', made_by='test', checks={})
    assert ViTClassifier.from_file(tmp_path / 'vit.pth', config).position_target == 'cell'
    with pytest.raises(ValueError, match="position_target 'pixel'"):
        ViTClassifier(config, len(LABELS), position_target='pixel')


def test_cls_layout_labels_name_each_object_column_and_row(tmp_path):
    """--cls_layout: the [CLS] targets of a scene are its objects, then each object's column and
    row of the 3x3 layout ("red circle at the left", "red circle at the top"); the saved file
    lists them all and loads with the larger head."""
    import torch

    from dataset.synthetic import COL_NAMES, ROW_NAMES
    from dataset.transforms import create_transform
    from tools.unimodal_init import LAYOUT_LABELS, Scenes, ViTClassifier, train_vit
    from utils import load_config
    config = load_config('configs/tiny/Pretrain.yaml')
    assert len(LAYOUT_LABELS) == len(LABELS) * 6
    scenes = Scenes(3, 'layout-test', create_transform('test', 64), grid=8)
    for _, labels, _ in scenes:
        named = {(LABELS + LAYOUT_LABELS)[i] for i in labels.nonzero().flatten().tolist()}
        objects = named & set(LABELS)
        assert objects and all(n.rsplit(' at the ', 1)[0] in objects for n in named - objects)
        for o in objects:  # one column and one row per object
            assert sum(f'{o} at the {p}' in named for p in COL_NAMES) == 1
            assert sum(f'{o} at the {p}' in named for p in ROW_NAMES) == 1
    torch.manual_seed(0)
    model, checks = train_vit(config, [], '.', scenes=160, lr=1e-3, batch_size=8,
                              device=torch.device('cpu'), cls_layout=True)
    assert model.head.out_features == len(LABELS) + len(LAYOUT_LABELS)
    assert 0 <= checks['cls_layout'] <= 1
    model.save(tmp_path / 'vit.pth', made_by='test', checks=checks)
    saved = torch.load(tmp_path / 'vit.pth', weights_only=True)
    assert saved['labels'] == LABELS + LAYOUT_LABELS
    assert ViTClassifier.from_file(tmp_path / 'vit.pth', config).head.out_features == len(saved['labels'])
