"""Datasets to tokens: prompt strategies (`strategies`) and building the train/eval sets
(`build`)."""
