//! image-pipeline
