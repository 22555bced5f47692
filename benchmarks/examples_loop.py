"""pytorch/examples' MNIST training loop (mnist/main.py: torchvision's dataset with ToTensor and
Normalize((0.1307,), (0.3081,)), a DataLoader with one worker and pinned memory on a GPU, a plain loop),
training mnist_dist's CNN with mnist_dist's recipe (Adam 1e-3, batch 128): the baseline that
`benchmarks/bench.py --model cnn` times mnist_dist against, on the same network and files.

    python benchmarks/examples_loop.py TORCHVISION_ROOT EPOCHS [--fashion]   # prints one JSON line
"""

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mnist_dist.clock import since_process_start
from mnist_dist.model import CNN


def main() -> None:
    root, epochs = sys.argv[1], int(sys.argv[2])
    Dataset = datasets.FashionMNIST if "--fashion" in sys.argv else datasets.MNIST
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = Dataset(root, train=True, download=False, transform=transform)
    test_set = Dataset(root, train=False, download=False, transform=transform)
    loader_kwargs = {"num_workers": 1, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(train_set, batch_size=128, shuffle=True, **loader_kwargs)
    test_loader = DataLoader(test_set, batch_size=1000, **loader_kwargs)
    torch.manual_seed(0)
    model = CNN(len(train_set.classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    epoch_seconds, first_step = [], None
    for _ in range(epochs):
        began = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            if first_step is None:
                first_step = since_process_start()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - began)
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
