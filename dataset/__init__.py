"""Dataset, sampler and loader factories used by the task scripts (spec sections 8.1 and 12)."""
import torch
from torch.utils.data import DataLoader, DistributedSampler

# Imported under another name so that `dataset.pretrain_dataset` stays the module, not the class.
from dataset.pretrain_dataset import pretrain_dataset as _pretrain_dataset
from dataset.transforms import create_transform


def _pretrain(config):
    transform = create_transform('pretrain', config['image_res'])
    return _pretrain_dataset(config['train_file'], transform, max_words=config.get('max_words', 30),
                             image_root=config.get('image_root', ''))


# name -> builder(config); the builders return what the original returned for that name.
_BUILDERS = {
    'pretrain': _pretrain,
}


def create_dataset(name, config):
    """'pretrain' -> one dataset over all `config['train_file']` files."""
    if name not in _BUILDERS:
        raise ValueError(f'unknown dataset {name!r}; supported: {sorted(_BUILDERS)}')
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
