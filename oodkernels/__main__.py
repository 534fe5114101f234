"""``python -m oodkernels``: report which backend runs each operation on this machine, and why."""

from .ops import backend_info

if __name__ == "__main__":
    print(backend_info())
