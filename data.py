"""
Chest X-ray input: reading images (PNG 8/16-bit, JPEG, DICOM), finding them, preprocessing, datasets, samplers,
subject-level splits. (Being written: see the data.py section of the project spec.)
"""

# Intensity statistics of chest X-rays scaled to [0, 1] (mean / std over 500 NIH ChestX-ray14 + Kermany images at
# 224 px), used instead of ImageNet's RGB statistics for the project's own single-channel encoders.
CXR_MEAN = 0.518
CXR_STD = 0.248
