"""Top-1 / top-5 classification accuracy (ImageNet protocol; any labelled image dataset)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Dataset, *, device, batch_size: int = 64, workers: int = 0,
                        progress: bool = True, desc: str = "evaluating") -> dict:
    """Accuracy in percent over ``dataset``: ``{"top1", "top5", "images"}``."""
    if len(dataset) == 0:
        raise ValueError("the evaluation set is empty")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    model.eval()
    correct = torch.zeros(2, dtype=torch.long)
    seen = 0
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress)
    for images, labels in bar:
        logits = model(images.to(device, non_blocking=True))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
        hits = top == labels[:, None]
        correct += torch.stack([hits[:, :1].any(dim=1).sum(), hits.any(dim=1).sum()])
        seen += len(labels)
        bar.set_postfix(top1=f"{100 * correct[0].item() / seen:.2f}")
    return {"top1": 100.0 * correct[0].item() / seen, "top5": 100.0 * correct[1].item() / seen, "images": seen}
