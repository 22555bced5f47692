"""The seed tutorial's pipeline, as the tutorial writes it: torchvision MNIST + ToTensor + Normalize,
a DataLoader with 2 workers, a plain PyTorch loop. The baseline that benchmarks/bench.py compares with.

    python benchmarks/tutorial.py TORCHVISION_ROOT EPOCHS [--fashion]   # prints one JSON line
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


def main() -> None:
    root, epochs = sys.argv[1], int(sys.argv[2])
    Dataset = datasets.FashionMNIST if "--fashion" in sys.argv else datasets.MNIST
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train_set = Dataset(root, train=True, download=False, transform=transform)
    test_set = Dataset(root, train=False, download=False, transform=transform)
    train_loader = DataLoader(train_set, batch_size=128, shuffle=True, num_workers=2)
    test_loader = DataLoader(test_set, batch_size=1000, num_workers=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
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
