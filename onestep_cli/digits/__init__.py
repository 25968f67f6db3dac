"""The embedded default: scikit-learn's handwritten digits, the small EDM teacher trained on them, and a digits
classifier whose features give the domain metrics `fd_digits` and `class_accuracy` (docs/digits.md)."""
