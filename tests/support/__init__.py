"""Support code for the end-to-end tests: real upstream registries, token server, images, skopeo."""
