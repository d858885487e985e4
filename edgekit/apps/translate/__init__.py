"""Offline speech-to-translation: microphone or WAV -> VAD -> the bundle's audio path -> text.

    microphone.py   16 kHz capture (sounddevice / PortAudio), the one true hardware boundary
    vad.py          energy-based voice activity detection that cuts utterances
    loop.py         the translate loop: prompt per utterance, streamed answers
    cli.py          `edgekit translate`
"""
