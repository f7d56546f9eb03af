"""The bundled small teacher: procedural shape pictures, a pixel-space MMDiT trained on them, its judge,
and Glance on it (pair training, rendering, the demo). Plain torch + diffusers; no ComfyUI."""
