import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """One saved tiny pipeline folder per family, built once per test session."""
    from tests.tiny_models import FAMILIES, tiny_pipeline

    folders = {}
    for family in FAMILIES:
        folder = str(tmp_path_factory.mktemp(family))
        tiny_pipeline(family, folder)
        folders[family] = folder
    return folders
