"""What a mask's values mean, on every floor of the library: 0 background, 1..K the dataset's
classes (in its `categories` order), 255 ignored (neither learnt nor scored)."""

BACKGROUND = "Background"
IGNORE_INDEX = 255
MAX_CLASSES = IGNORE_INDEX - 1   # foreground classes a uint8 mask holds beside background (0) and ignore (255)
