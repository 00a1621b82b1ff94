"""VLM: task-agnostic video-language pre-training over cached S3D features and WordPiece text."""
