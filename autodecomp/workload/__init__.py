"""What is compressed and how it is trained: models, data sets, training, the proxy fine-tune."""
