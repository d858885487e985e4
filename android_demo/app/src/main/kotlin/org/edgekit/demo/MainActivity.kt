package org.edgekit.demo

import android.Manifest
import android.annotation.SuppressLint
import android.graphics.Bitmap
import android.graphics.ImageDecoder
import android.media.AudioFormat
import android.media.AudioRecord
import android.media.MediaRecorder
import android.net.Uri
import android.os.Bundle
import android.provider.MediaStore
import androidx.activity.ComponentActivity
import androidx.activity.compose.rememberLauncherForActivityResult
import androidx.activity.compose.setContent
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.compose.foundation.layout.*
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.material3.*
import androidx.compose.runtime.*
import androidx.compose.ui.Modifier
import androidx.compose.ui.unit.dp
import java.io.File
import kotlin.concurrent.thread

/** The bundle folder: `adb push NAME.edgekit /sdcard/Android/data/org.edgekit.demo/files/` (README). */
private fun findBundle(activity: ComponentActivity): File? =
    activity.getExternalFilesDir(null)?.listFiles()?.firstOrNull { it.isDirectory && it.name.endsWith(".edgekit") }

/** Resident and peak memory of this process, from /proc/self/status (as bench's peak RSS). */
private fun memoryLine(): String {
    val status = File("/proc/self/status").readLines().associate { it.substringBefore(':') to it.substringAfter(':').trim() }
    return "RSS ${status["VmRSS"]}, peak ${status["VmHWM"]}"
}

class MainActivity : ComponentActivity() {
    private var engine: Engine? = null
    private val turns = mutableListOf<Turn>()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent { MaterialTheme { ChatScreen() } }
    }

    override fun onDestroy() {
        engine?.run { stop(); close() }
        super.onDestroy()
    }

    @Composable
    private fun ChatScreen() {
        val lines = remember { mutableStateListOf<String>() }
        var status by remember { mutableStateOf("Loading the bundle…") }
        var input by remember { mutableStateOf("") }
        var busy by remember { mutableStateOf(true) }
        var pending by remember { mutableStateOf<Part?>(null) }
        var recording by remember { mutableStateOf<Recorder?>(null) }
        fun say(message: String) = runOnUiThread { status = message }

        LaunchedEffect(Unit) {
            thread {
                val dir = findBundle(this@MainActivity)
                try {
                    if (dir == null) throw BundleException("no NAME.edgekit folder in ${getExternalFilesDir(null)}; adb push one (README)")
                    // sha256 of every file at first load: a bad copy is caught before the runner maps it.
                    engine = Engine.open(dir, BuildConfig.BUNDLE_FORMAT, BuildConfig.BUNDLE_DEVICES.split(","), hash = true)
                    say("${dir.name}: ${engine!!.manifest.device}, context ${engine!!.manifest.maxContext}. ${memoryLine()}")
                    busy = false
                } catch (e: Exception) { // a refused bundle is a message, never a crash
                    say(e.message ?: e.toString())
                }
            }
        }

        val pickPhoto = rememberLauncherForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri: Uri? ->
            if (uri != null) pending = decodePhoto(uri)?.also { say("Photo attached.") } ?: run { say("That image cannot be decoded."); null }
        }
        val askMicrophone = rememberLauncherForActivityResult(ActivityResultContracts.RequestPermission()) { granted ->
            if (granted) recording = Recorder(engine!!.manifest.audio?.samplingRate ?: 16_000).also { it.start(); say("Recording… tap again to stop.") }
            else say("Microphone permission denied: voice messages are off (Settings > Apps to allow).")
        }

        Column(Modifier.fillMaxSize().padding(12.dp)) {
            Text(status, style = MaterialTheme.typography.bodySmall)
            LazyColumn(Modifier.weight(1f)) { items(lines) { Text(it, Modifier.padding(vertical = 4.dp)) } }
            OutlinedTextField(input, { input = it }, Modifier.fillMaxWidth(), label = { Text("Message") })
            Row {
                TextButton(onClick = { pickPhoto.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly)) }, enabled = !busy) { Text("Photo") }
                TextButton(onClick = {
                    val active = recording
                    if (active == null) askMicrophone.launch(Manifest.permission.RECORD_AUDIO)
                    else {
                        recording = null
                        val samples = active.stop()
                        pending = runCatching { engine!!.audioPart(samples) }
                            .onSuccess { say("Voice message attached (${samples.size * 1000L / active.rate} ms).") }
                            .onFailure { say("The recording cannot be used: ${it.message}") }.getOrNull()
                    }
                }, enabled = !busy) { Text(if (recording == null) "Record" else "Stop") }
                Button(onClick = {
                    val parts = listOfNotNull(pending, Part.Text(input))
                    turns.add(Turn(fromUser = true, parts = parts))
                    lines.add("You: $input"); lines.add("")
                    input = ""; pending = null; busy = true
                    val started = System.nanoTime()
                    thread {
                        val answer = StringBuilder()
                        var count = 0
                        try {
                            engine!!.answer(turns) { piece ->
                                answer.append(piece); count++
                                val rate = count / ((System.nanoTime() - started) / 1e9)
                                runOnUiThread { lines[lines.size - 1] = answer.toString(); status = "%.1f tok/s. %s".format(rate, memoryLine()) }
                            }
                            turns.add(Turn(fromUser = false, parts = listOf(Part.Text(answer.toString()))))
                        } catch (e: Exception) { // past the context, a piece too long, ...: the runner's message
                            turns.removeAt(turns.size - 1)
                            say("Not answered: ${e.message}")
                        }
                        busy = false
                    }
                }, enabled = !busy && input.isNotBlank()) { Text("Send") }
                TextButton(onClick = { engine?.stop() }, enabled = busy && engine != null) { Text("Stop") }
            }
        }
    }

    /** The photo resized to the bundle's target size, RGB channels first; null if it cannot be decoded. */
    private fun decodePhoto(uri: Uri): Part.Image? = runCatching {
        val image = engine!!.manifest.image ?: throw IllegalArgumentException("this bundle has no vision encoder")
        @Suppress("DEPRECATION")
        val bitmap = if (android.os.Build.VERSION.SDK_INT >= 28)
            ImageDecoder.decodeBitmap(ImageDecoder.createSource(contentResolver, uri)) { d, _, _ -> d.allocator = ImageDecoder.ALLOCATOR_SOFTWARE }
        else MediaStore.Images.Media.getBitmap(contentResolver, uri)
        val (h, w) = imageTargetSize(bitmap.height, bitmap.width, image)
        val scaled = Bitmap.createScaledBitmap(bitmap, w, h, true)
        val pixels = IntArray(w * h).also { scaled.getPixels(it, 0, w, 0, 0, w, h) }
        val chw = IntArray(3 * w * h)
        for (i in pixels.indices) {
            chw[i] = pixels[i] shr 16 and 0xff; chw[w * h + i] = pixels[i] shr 8 and 0xff; chw[2 * w * h + i] = pixels[i] and 0xff
        }
        Part.Image(chw, w, h)
    }.getOrNull()
}

/** 16 kHz mono float samples from the microphone, on a thread of its own. */
private class Recorder(val rate: Int) { // the bundle's audio_preprocessing.sampling_rate
    private val size = AudioRecord.getMinBufferSize(rate, AudioFormat.CHANNEL_IN_MONO, AudioFormat.ENCODING_PCM_FLOAT)
    @SuppressLint("MissingPermission") // asked for just before
    private val record = AudioRecord(MediaRecorder.AudioSource.MIC, rate, AudioFormat.CHANNEL_IN_MONO, AudioFormat.ENCODING_PCM_FLOAT, size * 4)
    private val samples = ArrayList<Float>()
    @Volatile private var running = false
    private var reader: Thread? = null

    fun start() {
        running = true
        record.startRecording()
        reader = thread {
            val buffer = FloatArray(size)
            while (running) {
                val n = record.read(buffer, 0, buffer.size, AudioRecord.READ_BLOCKING)
                if (n > 0) synchronized(samples) { for (i in 0 until n) samples.add(buffer[i]) }
            }
        }
    }

    fun stop(): FloatArray {
        running = false
        reader?.join()
        record.stop(); record.release()
        return synchronized(samples) { samples.toFloatArray() }
    }
}
