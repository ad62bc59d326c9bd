"""Every on-disk layout of the project, in one place (see ARCHITECTURE.md): atomic files and staged directories
(`files`), safetensors weights (`weights`), checkpoint paths and model loading (`models`), training checkpoints
(`checkpoints`)."""
