"""The archive model: opening, walking, checking and writing VMA streams."""
