// Apache Kafka's Java client as a CDP's Kafka destination and a downstream service use it (issue 23).
// Run as a single source file (Java 11+), with the kafka-clients jar the stack fetches on the class path:
//   java -cp '.stack/kafka-libs/*' tests/stack/java/CdpClient.java produce BOOTSTRAP TOPIC FILE
//       each JSONL line, keyed by its userId (else anonymousId), zstd, the client's default
//       (murmur2) partitioner, with headers; prints "sent N"
//   java -cp '.stack/kafka-libs/*' tests/stack/java/CdpClient.java consume BOOTSTRAP TOPIC COUNT TIMEOUT_MS
//       reads TOPIC from the start with isolation.level=read_committed until COUNT records and 5 quiet
//       seconds (or the timeout); prints each record's value, one per line
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class CdpClient {
    public static void main(String[] args) throws Exception {
        if (args[0].equals("produce")) {
            produce(args[1], args[2], Path.of(args[3]));
        } else {
            consume(args[1], args[2], Integer.parseInt(args[3]), Long.parseLong(args[4]));
        }
    }

    static void produce(String bootstrap, String topic, Path file) throws Exception {
        Properties p = new Properties();
        p.put("bootstrap.servers", bootstrap);
        p.put("key.serializer", StringSerializer.class.getName());
        p.put("value.serializer", ByteArraySerializer.class.getName());
        p.put("compression.type", "zstd");
        p.put("acks", "all");
        p.put("enable.idempotence", "true");
        p.put("linger.ms", "5");
        ObjectMapper json = new ObjectMapper();
        List<String> lines = Files.readAllLines(file, StandardCharsets.UTF_8);
        int sent = 0;
        try (KafkaProducer<String, byte[]> producer = new KafkaProducer<>(p)) {
            for (String line : lines) {
                if (line.isBlank()) continue;
                String key = null;
                try {
                    JsonNode doc = json.readTree(line);
                    JsonNode who = doc.hasNonNull("userId") ? doc.get("userId") : doc.get("anonymousId");
                    key = who == null ? null : who.asText();
                } catch (Exception notJson) {
                    // a malformed line goes out unkeyed, as a destination would forward it
                }
                ProducerRecord<String, byte[]> r = new ProducerRecord<>(topic, key, line.getBytes(StandardCharsets.UTF_8));
                r.headers().add("content-type", "application/json".getBytes(StandardCharsets.UTF_8));
                r.headers().add("x-cdp-destination", "java-test".getBytes(StandardCharsets.UTF_8));
                producer.send(r);
                sent++;
            }
            producer.flush();
        }
        System.out.println("sent " + sent);
    }

    static void consume(String bootstrap, String topic, int want, long timeoutMs) {
        Properties p = new Properties();
        p.put("bootstrap.servers", bootstrap);
        p.put("group.id", "java-reader-" + UUID.randomUUID());
        p.put("auto.offset.reset", "earliest");
        p.put("isolation.level", "read_committed");
        p.put("enable.auto.commit", "false");
        p.put("key.deserializer", ByteArrayDeserializer.class.getName());
        p.put("value.deserializer", ByteArrayDeserializer.class.getName());
        long deadline = System.currentTimeMillis() + timeoutMs, quietSince = System.currentTimeMillis();
        int n = 0;
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(p)) {
            consumer.subscribe(List.of(topic));
            while (System.currentTimeMillis() < deadline) {
                var records = consumer.poll(Duration.ofMillis(200));
                for (ConsumerRecord<byte[], byte[]> r : records) {
                    System.out.println(new String(r.value(), StandardCharsets.UTF_8));
                    n++;
                    quietSince = System.currentTimeMillis();
                }
                if (n >= want && System.currentTimeMillis() - quietSince >= 5000) break;
            }
        }
        System.out.flush();
    }
}
