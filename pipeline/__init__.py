"""COCO semantic segmentation pipeline: library code. Stages in `stages/` are thin wrappers."""
