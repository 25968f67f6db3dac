import os

# Never let a test wait on hub retries: everything here is offline by design.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
