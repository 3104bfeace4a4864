"""Dataset factories of the task scripts (the names of the original), and their loaders."""
# Imported under other names so that `dataset.pretrain_dataset` etc. stay the modules, not the classes.
from dataset.caption_dataset import re_eval_dataset as _re_eval_dataset
from dataset.faults import BadSamplePolicy, skipped_samples
from dataset.caption_dataset import re_train_dataset as _re_train_dataset
from dataset.grounding_dataset import grounding_dataset as _grounding_dataset
from dataset.nlvr_dataset import nlvr_dataset as _nlvr_dataset
from dataset.pretrain_dataset import check_evaluation_set
from dataset.pretrain_dataset import pretrain_dataset as _pretrain_dataset
from dataset.shards import PretrainShards, is_shard_pattern
from dataset.transforms import create_transform
from dataset.ve_dataset import ve_dataset as _ve_dataset
from dataset.vqa_dataset import vqa_collate_fn
from dataset.vqa_dataset import vqa_dataset as _vqa_dataset
from dataset.loaders import create_loader, create_sampler, eval_loader, train_loader

__all__ = ['create_dataset', 'vqa_eval_dataset', 'create_sampler', 'create_loader', 'eval_loader',
           'train_loader', 'vqa_collate_fn', 'skipped_samples']


def _policy(config):
    # NOTE(fixed): the original stopped at the first unreadable image; training data follows the
    # config's on_bad_sample (see dataset/faults.py), evaluation data always fails, because
    # serving another sample in place of a bad one would change the metric.
    return config['on_bad_sample']


def _train(dataset, config):
    return BadSamplePolicy(dataset, _policy(config))


def _evaluation(dataset, config, key):
    # NOTE(fixed): evaluation data is first read after training; what would stop it there (no
    # records, a missing image, a text that cleaning empties) is refused while building it.
    return BadSamplePolicy(check_evaluation_set(dataset, key, config[key]), 'fail')


def _pretrain(config):
    transform = create_transform('pretrain', config['image_res'], config.get('augment'))
    files = config['train_file']
    if any(is_shard_pattern(f) for f in ([files] if isinstance(files, str) else files)):
        # webdataset shards (and JSONs beside them) as one stream that applies on_bad_sample itself
        return PretrainShards(files, transform, max_words=config['max_words'],
                              image_root=config['image_root'], on_bad_sample=_policy(config))
    return _train(_pretrain_dataset(config['train_file'], transform,
                                    max_words=config['max_words'], image_root=config['image_root'],
                                    on_bad_sample=_policy(config)), config)


def _train_and_test_transforms(config, train_kind='train'):
    return (create_transform(train_kind, config['image_res'], config.get('augment')),
            create_transform('test', config['image_res']))


def _re(config):
    train_transform, test_transform = _train_and_test_transforms(config)
    root = config['image_root']
    return (_train(_re_train_dataset(config['train_file'], train_transform, root,
                                     on_bad_sample=_policy(config)), config),
            _evaluation(_re_eval_dataset(config['val_file'], test_transform, root), config, 'val_file'),
            _evaluation(_re_eval_dataset(config['test_file'], test_transform, root), config, 'test_file'))


def _vqa(config):
    train_transform = create_transform('train', config['image_res'], config.get('augment'))
    return (_train(_vqa_dataset(config['train_file'], train_transform, config['vqa_root'],
                                config['vg_root'], eos=config['eos'], split='train',
                                on_bad_sample=_policy(config)), config),
            _vqa_eval(config, 'test_file'))


def _vqa_eval(config, key):
    return _evaluation(_vqa_dataset(config[key], create_transform('test', config['image_res']),
                                    config['vqa_root'], config['vg_root'], eos=config['eos'],
                                    split='test', answer_list=config['answer_list']), config, key)


def _nlvr(config):
    train_transform, test_transform = _train_and_test_transforms(config)
    root = config['image_root']
    return (_train(_nlvr_dataset(config['train_file'], train_transform, root,
                                 on_bad_sample=_policy(config)), config),
            _evaluation(_nlvr_dataset(config['val_file'], test_transform, root), config, 'val_file'),
            _evaluation(_nlvr_dataset(config['test_file'], test_transform, root), config, 'test_file'))


def _ve(config):
    train_transform, test_transform = _train_and_test_transforms(config)
    root = config['image_root']
    return (_train(_ve_dataset(config['train_file'], train_transform, root,
                               on_bad_sample=_policy(config)), config),
            _evaluation(_ve_dataset(config['val_file'], test_transform, root), config, 'val_file'),
            _evaluation(_ve_dataset(config['test_file'], test_transform, root), config, 'test_file'))


def _grounding(config):
    train_transform, test_transform = _train_and_test_transforms(config, train_kind='grounding_train')
    root = config['image_root']
    return (_train(_grounding_dataset(config['train_file'], train_transform, root, mode='train',
                                      on_bad_sample=_policy(config)), config),
            _evaluation(_grounding_dataset(config['test_file'], test_transform, root, mode='test'),
                        config, 'test_file'))


_TASK = {'re': 'retrieval'}  # the config task of a dataset name

# name -> builder(config); the builders return what the original returned for that name.
_BUILDERS = {
    'pretrain': _pretrain,
    're': _re,
    'vqa': _vqa,
    'nlvr': _nlvr,
    've': _ve,
    'grounding': _grounding,
}


def create_dataset(name, config):
    """'pretrain' -> one dataset over all `config['train_file']` files;
    're', 'nlvr', 've' -> (train, val, test); 'vqa', 'grounding' -> (train, test).

    Training sets use the task's augmenting transform, the others the plain test transform.
    Keys absent from `config` (an original config) take their defaults (utils.KEYS).
    """
    if name not in _BUILDERS:
        raise ValueError(f'unknown dataset {name!r}; supported: {list(_BUILDERS)}')
    from utils import with_defaults
    return _BUILDERS[name](with_defaults(config, _TASK.get(name, name)))


def vqa_eval_dataset(config, key='val_file'):
    """The questions of `config[key]` answered by ranking `answer_list` (VQA.py's optional
    val_file with human answers, scored locally), checked as create_dataset checks test_file."""
    from utils import with_defaults
    return _vqa_eval(with_defaults(config, 'vqa'), key)
