"""The baselines that benchmarks/bench.py compares with, each a plain PyTorch loop over torchvision's
dataset with ToTensor + Normalize:
- the seed tutorial's pipeline, as the tutorial writes it: its MLP, Normalize(0.5, 0.5), a DataLoader with
  2 workers;
- with --pytorch-examples, pytorch/examples' MNIST loop (mnist/main.py: Normalize(0.1307, 0.3081), one
  worker, pinned memory on a GPU) training mnist_dist's CNN with mnist_dist's recipe (Adam 1e-3, batch 128).

    python benchmarks/tutorial.py TORCHVISION_ROOT EPOCHS [--fashion] [--pytorch-examples]   # one JSON line
"""

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mnist_dist.clock import since_process_start  # as mnist_dist measures it: from the OS starting the process
from mnist_dist.model import CNN


def main() -> None:
    root, epochs = sys.argv[1], int(sys.argv[2])
    Dataset = datasets.FashionMNIST if "--fashion" in sys.argv else datasets.MNIST
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    examples = "--pytorch-examples" in sys.argv
    mean, std = (0.1307, 0.3081) if examples else (0.5, 0.5)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    train_set = Dataset(root, train=True, download=False, transform=transform)
    test_set = Dataset(root, train=False, download=False, transform=transform)
    loader_kwargs = {"num_workers": 1, "pin_memory": device.type == "cuda"} if examples else {"num_workers": 2}
    train_loader = DataLoader(train_set, batch_size=128, shuffle=True, **loader_kwargs)
    test_loader = DataLoader(test_set, batch_size=1000, **loader_kwargs)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    model = (CNN(len(train_set.classes)) if examples else mlp).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    epoch_seconds, first_step = [], None
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if first_step is None:
                first_step = since_process_start()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - t0)
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in test_loader:
            correct += (model(images.to(device)).argmax(1) == labels.to(device)).sum().item()
    print(json.dumps({
        "epoch_seconds": epoch_seconds, "test_accuracy": correct / len(test_set),
        "seconds_to_first_step": first_step, "train_samples": len(train_set), "device_type": device.type,
        "steps_per_epoch": len(train_loader),
    }))


if __name__ == "__main__":
    main()
