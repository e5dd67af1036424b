"""The ndeconv model zoo: the paper's ten CIFAR-topology architectures, registered with timm as ``*_deconv``."""
