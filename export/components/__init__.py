"""Export-ready modules, one per bundle method: token_embedding, text_decoder, audio_encoder, vision_encoder."""
