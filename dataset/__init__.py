"""Dataset, sampler and loader factories used by the task scripts (spec sections 8.1 and 12)."""
import torch
from torch.utils.data import DataLoader, DistributedSampler

# Imported under other names so that `dataset.pretrain_dataset` etc. stay the modules, not the classes.
from dataset.caption_dataset import re_eval_dataset as _re_eval_dataset
from dataset.faults import BadSamplePolicy, skipped_samples
from dataset.caption_dataset import re_train_dataset as _re_train_dataset
from dataset.grounding_dataset import grounding_dataset as _grounding_dataset
from dataset.nlvr_dataset import nlvr_dataset as _nlvr_dataset
from dataset.pretrain_dataset import pretrain_dataset as _pretrain_dataset
from dataset.transforms import create_transform
from dataset.ve_dataset import ve_dataset as _ve_dataset
from dataset.vqa_dataset import vqa_collate_fn
from dataset.vqa_dataset import vqa_dataset as _vqa_dataset

__all__ = ['create_dataset', 'create_sampler', 'create_loader', 'vqa_collate_fn', 'skipped_samples']


def _policy(config):
    # NOTE(fixed): the original stopped at the first unreadable image; training data follows the
    # config's on_bad_sample (see dataset/faults.py), evaluation data always fails, because
    # serving another sample in place of a bad one would change the metric.
    return config.get('on_bad_sample', 'fail')


def _train(dataset, config):
    return BadSamplePolicy(dataset, _policy(config))


def _evaluation(dataset):
    return BadSamplePolicy(dataset, 'fail')


def _pretrain(config):
    transform = create_transform('pretrain', config['image_res'], config.get('augment'))
    return _train(_pretrain_dataset(config['train_file'], transform,
                                    max_words=config.get('max_words', 30),
                                    image_root=config.get('image_root', ''),
                                    on_bad_sample=_policy(config)), config)


def _train_and_test_transforms(config, train_kind='train'):
    return (create_transform(train_kind, config['image_res'], config.get('augment')),
            create_transform('test', config['image_res']))


def _re(config):
    train_transform, test_transform = _train_and_test_transforms(config)
    root = config['image_root']
    return (_train(_re_train_dataset(config['train_file'], train_transform, root,
                                     on_bad_sample=_policy(config)), config),
            _evaluation(_re_eval_dataset(config['val_file'], test_transform, root)),
            _evaluation(_re_eval_dataset(config['test_file'], test_transform, root)))


def _vqa(config):
    train_transform, test_transform = _train_and_test_transforms(config)
    roots = config['vqa_root'], config['vg_root']
    eos = config.get('eos', '[SEP]')
    return (_train(_vqa_dataset(config['train_file'], train_transform, *roots, eos=eos, split='train',
                                on_bad_sample=_policy(config)), config),
            _evaluation(_vqa_dataset(config['test_file'], test_transform, *roots, eos=eos,
                                     split='test', answer_list=config['answer_list'])))


def _nlvr(config):
    train_transform, test_transform = _train_and_test_transforms(config)
    root = config['image_root']
    return (_train(_nlvr_dataset(config['train_file'], train_transform, root,
                                 on_bad_sample=_policy(config)), config),
            _evaluation(_nlvr_dataset(config['val_file'], test_transform, root)),
            _evaluation(_nlvr_dataset(config['test_file'], test_transform, root)))


def _ve(config):
    train_transform, test_transform = _train_and_test_transforms(config)
    root = config['image_root']
    return (_train(_ve_dataset(config['train_file'], train_transform, root,
                               on_bad_sample=_policy(config)), config),
            _evaluation(_ve_dataset(config['val_file'], test_transform, root)),
            _evaluation(_ve_dataset(config['test_file'], test_transform, root)))


def _grounding(config):
    train_transform, test_transform = _train_and_test_transforms(config, train_kind='grounding_train')
    root = config['image_root']
    return (_train(_grounding_dataset(config['train_file'], train_transform, root, mode='train',
                                      on_bad_sample=_policy(config)), config),
            _evaluation(_grounding_dataset(config['test_file'], test_transform, root, mode='test')))


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
    """
    if name not in _BUILDERS:
        raise ValueError(f'unknown dataset {name!r}; supported: {list(_BUILDERS)}')
    return _BUILDERS[name](config)


def create_sampler(datasets, shuffles, num_tasks, global_rank):
    """One DistributedSampler per dataset (eval samplers pad with duplicates, as the original)."""
    return [DistributedSampler(dataset, num_replicas=num_tasks, rank=global_rank, shuffle=shuffle)
            for dataset, shuffle in zip(datasets, shuffles, strict=True)]


def create_loader(datasets, samplers, batch_size, num_workers, is_trains, collate_fns):
    """One DataLoader per dataset; training loaders drop the last incomplete batch."""
    loaders = []
    for dataset, sampler, bs, workers, is_train, collate_fn in zip(
            datasets, samplers, batch_size, num_workers, is_trains, collate_fns, strict=True):
        if is_train:
            per_rank = len(sampler) if sampler is not None else len(dataset)
            if per_rank < bs:
                raise ValueError(f'training dataset {type(dataset).__name__} has {per_rank} samples '
                                 f'per process, fewer than one batch of {bs}: the loader would be empty')
        loaders.append(DataLoader(
            dataset,
            batch_size=bs,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            sampler=sampler,
            shuffle=is_train and sampler is None,
            collate_fn=collate_fn,
            drop_last=is_train,
            persistent_workers=workers > 0,
        ))
    return loaders
