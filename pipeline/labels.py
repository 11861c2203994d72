"""What a mask's values mean, on every floor of the library: 0 background, 1..K the dataset's
classes (in its `categories` order), 255 ignored (neither learnt nor scored); and how an image's
values are normalised for the models (training's transform and every checkpoint's InputSpec)."""

BACKGROUND = "Background"
IGNORE_INDEX = 255
MAX_CLASSES = IGNORE_INDEX - 1   # foreground classes a uint8 mask holds beside background (0) and ignore (255)
NORMALISE = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # ImageNet mean, std of RGB in [0, 1]
